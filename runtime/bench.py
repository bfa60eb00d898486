"""Latency measurement (DESIGN §7): one session per model and provider, models timed interleaved, robust statistics.

What a measurement is:
- every model runs at `ORT_ENABLE_ALL`: onnxruntime already folds Conv+BN and fuses activations, so a saving
  measured against an unoptimised baseline is not a saving;
- inputs and outputs are bound once with IOBinding (device buffers on CUDA, host buffers on the CPU), so a timed
  call is the model and nothing else: no per-call numpy conversion, no host/device copy;
- on CUDA, `cudnn_conv_algo_search` (EXHAUSTIVE by default) and a CUDA graph (`enable_cuda_graph`) when every
  output shape is static and onnxruntime accepts to capture the whole graph on the GPU; any refusal falls back to a
  plain CUDA session and the reason is recorded. A session that asked for CUDA but runs on the CPU (onnxruntime-gpu
  falls back silently when its libraries do not load) is reported as CPU, from `session.get_providers()`;
- on the CPU, `intra_op_num_threads` as given and `session.set_denormal_as_zero` (a tail of subnormal numbers can
  make one model look 10-100x slower for reasons unrelated to its graph);
- session-creation time and first-run time (cuDNN's algorithm search, graph capture, memory arenas) are recorded
  apart; then a warm-up, then either a fixed number of rounds or a duration;
- the models of one comparison run interleaved, A B A B ..., one call each per round, so that drift on a shared
  machine (other jobs, thermal and frequency changes) hits all of them alike; the result is each model's ratio to
  the first one, with a bootstrap interval over rounds that keeps the pairing of each round;
- intra-op thread spinning is off by default (`spinning=True` turns it back on). On this 2-core CPU it made the
  linear ResNet-34 slower even alone (batch 64: 92 ms spinning, 55 ms not), because two spinning workers plus the
  caller's thread fight for two cores, and in an interleaved comparison one session's spinning workers also steal
  the cores from the next model's call. The faster setting for the baseline is the fair one; the report's
  `thread_spinning` says which was used;
- each timed call is preceded by one untimed call of the same model (`rewarm`): right after another model's long
  call a session's thread pool is asleep, and waking it costs ~0.1 ms, most of a small model's call.

Statistics are over per-call latencies: min, median (p50), p90, p99 (numpy's linear interpolation), mean, sample
standard deviation, and throughput = batch / mean latency. The clock is injectable (`timer=`) so that the
statistics and the interleaving are tested on a deterministic clock; no test depends on real speed.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from cnnc.io import target
from cnnc.errors import UsageError
from cnnc.runtime.inputs import graph_inputs, parse_input_shapes
from cnnc.runtime.session import cuda_available, make_session

Timer = Callable[[], float]
SessionFactory = Callable[..., ort.InferenceSession]

DEFAULT_WARMUP = {"cpu": 10, "cuda": 50}  # CUDA: EXHAUSTIVE cuDNN search and clock ramp-up need a longer warm-up
DEFAULT_DURATION_S = 5.0
MIN_ROUNDS = 5  # a duration never gives fewer rounds than this
MAX_ROUNDS = 200_000  # a duration never gives more (microsecond models would fill memory)
BOOTSTRAP_RESAMPLES = 1000
MAX_SAMPLES_KEPT = 4000  # per model and comparison, in the report


# ------------------------------------------------------------------------------------------------- statistics


def summarize(samples_s: Sequence[float], batch: int) -> dict:
    """Statistics of per-call latencies given in seconds; times in milliseconds, throughput in items per second."""
    values = np.asarray(samples_s, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no samples to summarize")
    mean = float(values.mean())
    p50, p90, p99 = (float(v) for v in np.percentile(values, [50, 90, 99]))
    return {
        "n": int(values.size),
        "min_ms": float(values.min()) * 1e3,
        "p50_ms": p50 * 1e3,
        "p90_ms": p90 * 1e3,
        "p99_ms": p99 * 1e3,
        "mean_ms": mean * 1e3,
        "std_ms": float(values.std(ddof=1)) * 1e3 if values.size > 1 else 0.0,
        "max_ms": float(values.max()) * 1e3,
        "throughput_per_s": batch / mean if mean > 0 else float("inf"),
    }


def ratio_to_first(first_s: Sequence[float], other_s: Sequence[float], seed: int = 0,
                   resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """How `other` compares with `first`, both timed in the same rounds (sample i of each comes from round i).

    `ratio` = median(other) / median(first) (< 1: other is faster), `speedup` = its inverse, `paired_median` = the
    median over rounds of other_i / first_i, and `ci95` a 95 % percentile-bootstrap interval of `ratio` that resamples
    whole rounds (seeded: the same samples always give the same interval).
    """
    first = np.asarray(first_s, dtype=np.float64)
    other = np.asarray(other_s, dtype=np.float64)
    if first.shape != other.shape or first.size == 0:
        raise ValueError("ratio_to_first needs two non-empty sample lists of one length (one per round)")
    if np.any(first <= 0) or np.any(other <= 0):
        raise ValueError("latencies must be positive (a clock that did not move?)")
    ratio = float(np.median(other) / np.median(first))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, first.size, size=(resamples, first.size))
    boot = np.median(other[picks], axis=1) / np.median(first[picks], axis=1)
    low, high = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    return {"ratio": ratio, "speedup": 1.0 / ratio, "paired_median": float(np.median(other / first)),
            "ci95": [low, high]}


def interleave(runners: Sequence[Callable[[], Any]], *, warmup: int, iters: int | None = None,
               duration: float | None = None, timer: Timer = time.perf_counter, min_rounds: int = MIN_ROUNDS,
               max_rounds: int = MAX_ROUNDS, rewarm: int = 0) -> list[list[float]]:
    """Time `runners` round-robin (A B A B ...): `warmup` untimed rounds, then `iters` rounds, or rounds until
    `duration` seconds have passed (at least `min_rounds`, at most `max_rounds`). Returns seconds per call, per
    runner, in round order.

    `rewarm` untimed calls precede each timed call of a runner. Each onnxruntime session has its own thread pool;
    right after another model's long call its threads are asleep, and waking them costs ~0.1 ms, which is most of a
    small model's call (a collapsed Gemm: 15 µs hot, 120 µs cold). One re-warm call per turn measures every model
    hot, as a service running it continuously would, while rounds still alternate so drift cancels."""
    if (iters is None) == (duration is None):
        raise UsageError("give either a number of iterations or a duration")
    if iters is not None and iters < 1:
        raise UsageError(f"iterations must be >= 1, got {iters}")
    if duration is not None and duration <= 0:
        raise UsageError(f"duration must be > 0 s, got {duration}")
    for _ in range(max(warmup, 0)):
        for run in runners:
            run()
    samples: list[list[float]] = [[] for _ in runners]
    started = timer()
    rounds = 0
    while True:
        if iters is not None:
            if rounds >= iters:
                break
        elif rounds >= max_rounds or (rounds >= min_rounds and timer() - started >= duration):
            break
        for run, times in zip(runners, samples):
            for _ in range(rewarm):
                run()
            begin = timer()
            run()
            times.append(timer() - begin)
        rounds += 1
    return samples


# ------------------------------------------------------------------------------------------------- inputs


def concrete_inputs(model: onnx.ModelProto, batch: int | None, input_shapes=None) -> dict[str, tuple]:
    """{input name: (shape, dtype)}. The leading dim is the batch: `batch` replaces it when it is symbolic (default
    1); a fixed leading dim must equal `batch`. Other symbolic dims come from `input_shapes` (name -> dims, whose
    leading entry is replaced by the batch where that dim is symbolic)."""
    given = parse_input_shapes(input_shapes)
    specs = graph_inputs(model)
    unknown = set(given) - {spec.name for spec in specs}
    if unknown:
        raise UsageError(f"--input-shape names unknown input(s) {', '.join(sorted(unknown))}")
    result = {}
    for spec in specs:
        declared = list(spec.dims)
        if spec.name in given:
            shape = list(given[spec.name])
            if len(shape) != len(declared) or any(isinstance(d, int) and d > 0 and d != g
                                                  for d, g in list(zip(declared, shape))[1:]):
                raise UsageError(f"--input-shape {spec.name}:{tuple(shape)} does not fit its declared shape "
                                 f"{tuple(declared)}")
            declared = [d if isinstance(d, int) and d > 0 else g for d, g in zip(declared, shape)]
            if shape and not (isinstance(spec.dims[0], int) and spec.dims[0] > 0):
                declared[0] = "batch"
        shape = []
        for axis, dim in enumerate(declared):
            if isinstance(dim, int) and dim > 0:
                if axis == 0 and batch is not None and dim != batch:
                    raise UsageError(f"input '{spec.name}' has a fixed batch of {dim}; it cannot run at batch {batch}")
                shape.append(dim)
            elif axis == 0:
                shape.append(batch or 1)
            else:
                raise UsageError(f"input '{spec.name}' has symbolic dim {dim!r} at axis {axis}; "
                                 f"give it with --input-shape {spec.name}:d0,d1,...")
        result[spec.name] = (tuple(shape), spec.dtype)
    return result


def make_feeds(shapes: dict[str, tuple], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded N(0, 1) floats (unit-scale data: no subnormal inputs), small non-negative integers, random booleans."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (shape, dtype) in shapes.items():
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[name] = rng.random(shape) < 0.5
        else:
            feeds[name] = rng.integers(0, 4, size=shape).astype(dtype)
    return feeds


def static_output_shapes(model: onnx.ModelProto, shapes: dict[str, tuple]) -> dict[str, tuple] | None:
    """Output shapes by ONNX shape inference at these input shapes, or None when any output stays symbolic."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value in copy.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, shapes[value.name][0]):
                dim.Clear()
                dim.dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(copy, strict_mode=False)
    except Exception:  # models above 2 GB or ops unknown to onnx: the outputs are allocated by onnxruntime instead
        return None
    result = {}
    for output in inferred.graph.output:
        tensor_type = output.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if not tensor_type.HasField("shape") or any(d is None or d <= 0 for d in dims):
            return None
        result[output.name] = (tuple(dims), np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)))
    return result


def runnable_model(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    """A validated ModelProto stamped with an IR version the installed onnxruntime accepts (never in place)."""
    if not isinstance(model, onnx.ModelProto):
        from cnnc.io.frontend import load_onnx

        model = load_onnx(model)
    return target.runnable(model)


# ------------------------------------------------------------------------------------------------- sessions


@dataclass
class PreparedModel:
    """One model's session, bound buffers, and what was learnt while preparing it."""

    label: str
    run: Callable[[], Any]
    info: dict = field(default_factory=dict)
    keep_alive: list = field(default_factory=list)  # session, binding and buffers must outlive `run`


def _session_options(threads: int | None, denormal_as_zero: bool, spinning: bool) -> dict:
    entries = {"session.set_denormal_as_zero": "1" if denormal_as_zero else "0"}
    if not spinning:
        entries["session.intra_op.allow_spinning"] = "0"
        entries["session.inter_op.allow_spinning"] = "0"
    return entries


def _bind(session: ort.InferenceSession, feeds: dict, outputs: dict | None, device: str):
    """IOBinding of `feeds` as `device` buffers; outputs pre-allocated when their shapes are known (CUDA graphs need
    fixed output addresses), else allocated by onnxruntime on `device`."""
    binding = session.io_binding()
    buffers = []
    for name, array in feeds.items():
        value = ort.OrtValue.ortvalue_from_numpy(array, device, 0)
        binding.bind_ortvalue_input(name, value)
        buffers.append(value)
    for output in session.get_outputs():
        if outputs is not None:
            shape, dtype = outputs[output.name]
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, device, 0)
            binding.bind_ortvalue_output(output.name, value)
            buffers.append(value)
        else:
            binding.bind_output(output.name, device)
    return binding, buffers


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def prepare(model: onnx.ModelProto, label: str, *, provider: str, batch: int | None, input_shapes=None,
            threads: int | None = None, cuda_graph: bool = True, cudnn_conv_algo_search: str = "EXHAUSTIVE",
            denormal_as_zero: bool = True, spinning: bool = False, seed: int = 0, timer: Timer = time.perf_counter,
            session_factory: SessionFactory = make_session) -> PreparedModel:
    """Create `model`'s session on `provider` ("cpu" or "cuda"), bind its inputs, and run it once (timed).

    On CUDA a CUDA-graph session is tried first; if it cannot be used (symbolic output shapes, nodes outside the
    CUDA provider, a capture failure) the plain CUDA session is used and `info["cuda_graph_note"]` says why.
    """
    shapes = concrete_inputs(model, batch, input_shapes)
    feeds = make_feeds(shapes, seed)
    outputs = static_output_shapes(model, shapes)
    config = _session_options(threads, denormal_as_zero, spinning)
    info: dict = {"label": label, "requested_provider": provider, "notes": [],
                  "inputs": {name: {"shape": list(shape), "dtype": str(np.dtype(dtype))}
                             for name, (shape, dtype) in shapes.items()},
                  "io_binding": True, "cuda_graph": False}
    attempts: list[tuple[bool, dict | None]] = []
    if provider == "cuda":
        cuda_options = {"cudnn_conv_algo_search": cudnn_conv_algo_search}
        if cuda_graph and outputs is None:
            info["cuda_graph_note"] = "not tried: an output shape is not static at these input shapes"
        elif cuda_graph:
            attempts.append((True, {**cuda_options, "enable_cuda_graph": "1"}))
        attempts.append((False, cuda_options))
    else:
        attempts.append((False, None))
    failure = None
    for graph_mode, cuda_options in attempts:
        started = timer()
        try:
            session = session_factory(model, provider, "all", threads, config, cuda_options)
        except Exception as error:  # onnxruntime refuses a CUDA graph when some node is not on the CUDA provider
            if not graph_mode:
                raise
            info["cuda_graph_note"] = f"session refused the CUDA graph: {_first_line(error)}"
            continue
        created = timer() - started
        actual = session.get_providers()
        device = "cuda" if provider == "cuda" and actual and actual[0] == "CUDAExecutionProvider" else "cpu"
        if provider == "cuda" and device == "cpu":
            info["notes"].append(f"asked for CUDA but onnxruntime runs the session on {actual}: measured on the CPU")
        binding, buffers = _bind(session, feeds, outputs, device)

        def run(session=session, binding=binding, device=device):
            session.run_with_iobinding(binding)
            if device == "cuda":  # the call may return before the GPU is done: wait for the outputs
                binding.synchronize_outputs()

        started = timer()
        try:
            run()
            first = timer() - started
            if graph_mode and device == "cuda":
                # onnxruntime runs once normally, captures on the next run and replays from the one after: do both
                # here, where a failure can still fall back, rather than in the warm-up.
                run()
                run()
        except Exception as error:  # onnxruntime raises its own hierarchy when a capture fails
            if not graph_mode:
                raise
            failure = error
            info["cuda_graph_note"] = f"CUDA graph capture failed: {_first_line(error)}"
            continue
        info.update({"provider": actual[0], "providers": list(actual), "device": device,
                     "cuda_graph": bool(graph_mode and device == "cuda"),
                     "session_create_ms": created * 1e3, "first_run_ms": first * 1e3})
        if graph_mode and device == "cuda":
            info["cuda_graph_note"] = "enabled: captured while preparing, replayed on every timed call"
        return PreparedModel(label, run, info, [session, binding, buffers])
    raise RuntimeError(f"no session could be prepared for {label}: {failure}")  # pragma: no cover - loop raises


# ------------------------------------------------------------------------------------------------- environment


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_library(names: Sequence[str]):
    # dlopen by soname returns the copy onnxruntime already loaded, so the versions are those that ran.
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _version_from_int(value: int, cudnn: bool = False) -> str:
    if cudnn:  # cuDNN 9 encodes major*10000 + minor*100 + patch, cuDNN 8 major*1000 + minor*100 + patch
        major, rest = (value // 10000, value % 10000) if value >= 90000 else (value // 1000, value % 1000)
        return f"{major}.{rest // 100}.{rest % 100}"
    return f"{value // 1000}.{(value % 1000) // 10}"  # CUDA: major*1000 + minor*10


def cuda_environment() -> dict:
    """GPU name, driver and runtime CUDA versions and cuDNN version, each None where it cannot be read."""
    found: dict = {"gpu": None, "cuda_driver": None, "cuda_runtime": None, "cudnn": None}
    driver = _load_library(["libcuda.so.1", "libcuda.so"])
    if driver is not None:
        device, version, name = ctypes.c_int(), ctypes.c_int(), ctypes.create_string_buffer(256)
        if (driver.cuInit(0) == 0 and driver.cuDeviceGet(ctypes.byref(device), 0) == 0
                and driver.cuDeviceGetName(name, 256, device) == 0):
            found["gpu"] = name.value.decode(errors="replace")
        if driver.cuDriverGetVersion(ctypes.byref(version)) == 0:
            found["cuda_driver"] = _version_from_int(version.value)
    runtime = _load_library(["libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"])
    if runtime is not None:
        version = ctypes.c_int()
        if runtime.cudaRuntimeGetVersion(ctypes.byref(version)) == 0:
            found["cuda_runtime"] = _version_from_int(version.value)
    cudnn = _load_library(["libcudnn.so.9", "libcudnn.so.8", "libcudnn.so"])
    if cudnn is not None:
        cudnn.cudnnGetVersion.restype = ctypes.c_size_t
        found["cudnn"] = _version_from_int(int(cudnn.cudnnGetVersion()), cudnn=True)
    return found


def environment(device_kind: str) -> dict:
    """Where the numbers come from. `device_kind` is "cpu" or "cuda" (then the GPU and CUDA versions are read)."""
    try:
        from onnxruntime.capi import build_and_package_info as ort_build

        ort_package, ort_cuda = ort_build.package_name, getattr(ort_build, "cuda_version", None)
    except ImportError:  # pragma: no cover - every onnxruntime wheel has it
        ort_package, ort_cuda = "onnxruntime", None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        affinity = os.cpu_count()
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "onnxruntime": ort.__version__,
        "onnxruntime_package": ort_package,
        "onnxruntime_built_for_cuda": ort_cuda,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        from importlib.metadata import version

        env["cnnc"] = version("cnnc")
    except Exception:  # pragma: no cover - running from a checkout that was never installed
        env["cnnc"] = None
    if device_kind == "cuda":
        env.update(cuda_environment())
    env["device"] = (env.get("gpu") or "CUDA device") if device_kind == "cuda" else env["cpu"]
    return env


def device_slug(report: dict) -> str:
    """`cpu-amd-epyc-2t` or `cuda-nvidia-h100-80gb-hbm3`: names result files so that devices never mix."""
    env, settings = report["environment"], report["settings"]
    slug = re.sub(r"[^a-z0-9]+", "-", str(env.get("device", "unknown")).lower()).strip("-")
    if "cuda" in settings.get("devices_used", [settings["device_kind"]]):
        return f"cuda-{slug}"
    threads = settings.get("threads") or env.get("cpus_usable")
    return f"cpu-{slug}-{threads}t"


# ------------------------------------------------------------------------------------------------- peers


def peer_models(model: onnx.ModelProto) -> tuple[list[tuple[str, onnx.ModelProto]], list[str]]:
    """`model` simplified by onnxsim and by OnnxSlim when they are installed (they are not dependencies of cnnc).
    Returns (label, model) pairs and notes on what was skipped or failed."""
    peers, notes = [], []

    def copy_of(source):
        duplicate = onnx.ModelProto()
        duplicate.CopyFrom(source)
        return duplicate

    try:
        import onnxsim
    except ImportError:
        notes.append("peer onnxsim skipped: not installed (pip install onnxsim)")
    else:
        try:
            simplified, check_ok = onnxsim.simplify(copy_of(model))
            peers.append(("onnxsim", runnable_model(simplified)))
            if not check_ok:
                notes.append("onnxsim's own output check failed; its model is timed anyway")
        except Exception as error:  # a third-party tool: report whatever it raises, do not stop the bench
            notes.append(f"peer onnxsim failed: {type(error).__name__}: {_first_line(error)}")
    try:
        import onnxslim
    except ImportError:
        notes.append("peer onnxslim skipped: not installed (pip install onnxslim)")
    else:
        try:
            peers.append(("onnxslim", runnable_model(onnxslim.slim(copy_of(model)))))
        except Exception as error:  # a third-party tool: report whatever it raises, do not stop the bench
            notes.append(f"peer onnxslim failed: {type(error).__name__}: {_first_line(error)}")
    return peers, notes


# ------------------------------------------------------------------------------------------------- benchmark


def _comparison(prepared: list[PreparedModel], samples: list[list[float]], batch: int, seed: int) -> dict:
    entries = []
    first = prepared[0]
    for index, (model, times) in enumerate(zip(prepared, samples)):
        # Statistics use every sample; the report keeps at most MAX_SAMPLES_KEPT of them (every k-th, in round
        # order) for plots, so that microsecond models timed for seconds do not make megabyte reports.
        every = -(-len(times) // MAX_SAMPLES_KEPT)
        entry = {**model.info, "stats": summarize(times, batch),
                 "samples_ms": [round(t * 1e3, 6) for t in times[::every]], "samples_kept_every": every}
        if index == 0:
            entry["ratio_to_first"] = {"ratio": 1.0, "speedup": 1.0, "paired_median": 1.0, "ci95": [1.0, 1.0]}
        elif model.info["device"] != first.info["device"]:
            # Never mix devices in one ratio: a CPU-vs-GPU number says nothing about the rewrite.
            entry["ratio_to_first"] = None
            entry["notes"] = [*entry["notes"], (f"no ratio: ran on {model.info['provider']}, the first model on "
                                                f"{first.info['provider']}")]
        else:
            entry["ratio_to_first"] = ratio_to_first(samples[0], times, seed)
        entries.append(entry)
    return {"title": f"batch {batch}", "batch": batch, "rounds": len(samples[0]), "models": entries}


def _batches(batch) -> list[int | None]:
    if batch is None:
        return [None]
    if isinstance(batch, int):
        batch = [batch]
    values = list(batch)
    if not values or any(not isinstance(b, int) or b < 1 for b in values):
        raise UsageError(f"batch sizes must be positive integers, got {batch!r}")
    return values


def bench_models(models: Sequence[onnx.ModelProto | str | Path], labels: Sequence[str] | None = None, *,
                 batch: int | Sequence[int] | None = None, provider: str = "auto", warmup: int | None = None,
                 iters: int | None = None, duration: float | None = None, threads: int | None = None,
                 input_shapes=None, cuda_graph: bool = True, cudnn_conv_algo_search: str = "EXHAUSTIVE",
                 denormal_as_zero: bool = True, spinning: bool = False, peers: bool = False, seed: int = 0,
                 rewarm: int = 1,
                 timer: Timer = time.perf_counter, session_factory: SessionFactory = make_session,
                 log: Callable[[str], None] | None = None) -> dict:
    """Benchmark `models` against the first one, interleaved, at every batch size in `batch`; returns the report.

    `models`: ModelProtos or ONNX paths; `labels` default to the file names (or model 1, 2, ...). `batch`: one size
    or several (None: the model's own leading dim, 1 when symbolic). `provider`: auto (CUDA when onnxruntime can run
    it, else CPU), cuda or cpu. `warmup` rounds (default 10 on the CPU, 50 on CUDA); then `iters` rounds or
    `duration` seconds (default 5 s) per batch size. `peers` adds onnxsim / OnnxSlim outputs of the first model.

    The report (a JSON-able dict): `environment`, `settings`, `notes`, and one `comparisons` entry per batch size
    with each model's provider, session-creation and first-run times, statistics, samples and ratio to the first.
    """
    if provider not in ("auto", "cuda", "cpu"):
        raise UsageError(f"unknown provider {provider!r}; use auto, cuda or cpu")
    if not models:
        raise UsageError("nothing to benchmark: give at least one model")
    if provider == "cuda" and not cuda_available():
        raise UsageError("--provider cuda: no CUDA device or CUDA provider available")
    device_kind = "cuda" if provider == "cuda" or (provider == "auto" and cuda_available()) else "cpu"
    if labels is None:
        labels = [Path(m).name if isinstance(m, (str, Path)) else f"model {i + 1}" for i, m in enumerate(models)]
    labels = list(labels)
    if len(labels) != len(models):
        raise UsageError(f"{len(models)} models but {len(labels)} labels")
    protos = [runnable_model(m) for m in models]
    notes: list[str] = []
    if peers:
        found, peer_notes = peer_models(protos[0])
        notes += peer_notes
        protos += [model for _, model in found]
        labels += [label for label, _ in found]
    labels = [label if labels.count(label) == 1 else f"{label} #{i + 1}" for i, label in enumerate(labels)]
    if iters is None and duration is None:
        duration = DEFAULT_DURATION_S
    warmup = DEFAULT_WARMUP[device_kind] if warmup is None else warmup
    settings = {"provider_requested": provider, "device_kind": device_kind, "optimization": "ORT_ENABLE_ALL",
                "warmup_rounds": warmup, "iters": iters, "duration_s": duration, "threads": threads,
                "intra_op_num_threads": threads or "onnxruntime default (one per physical core)",
                "denormal_as_zero": denormal_as_zero, "thread_spinning": spinning, "io_binding": True,
                "cuda_graph_requested": cuda_graph and device_kind == "cuda",
                "cudnn_conv_algo_search": cudnn_conv_algo_search if device_kind == "cuda" else None,
                "interleaved": "round-robin, one timed call per model per round",
                "rewarm_calls": rewarm, "seed": seed}
    env = environment(device_kind)
    comparisons = []
    for size in _batches(batch):
        prepared = [prepare(model, label, provider=device_kind, batch=size, input_shapes=input_shapes,
                            threads=threads, cuda_graph=cuda_graph, cudnn_conv_algo_search=cudnn_conv_algo_search,
                            denormal_as_zero=denormal_as_zero, spinning=spinning, seed=seed, timer=timer,
                            session_factory=session_factory) for model, label in zip(protos, labels)]
        effective = size or next(iter(prepared[0].info["inputs"].values()), {"shape": [1]})["shape"][0]
        if log:
            log(f"batch {effective}: timing {', '.join(labels)} interleaved")
        samples = interleave([p.run for p in prepared], warmup=warmup, iters=iters, duration=duration, timer=timer,
                             rewarm=rewarm)
        comparisons.append(_comparison(prepared, samples, effective, seed))
        comparisons[-1]["loadavg_1_5_15_after"] = [round(v, 2) for v in os.getloadavg()]
        del prepared  # free the sessions (and device memory) before the next batch size
    env["loadavg_1_5_15_end"] = [round(v, 2) for v in os.getloadavg()]
    settings["devices_used"] = sorted({m["device"] for c in comparisons for m in c["models"]})
    return {"tool": "cnnc bench", "environment": env, "settings": settings, "notes": notes,
            "comparisons": comparisons}
