"""Latency measurement (ARCHITECTURE.md, runtime): one session per model and provider, models timed interleaved.

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

This module prepares the sessions and runs the interleaved rounds; it builds on `cnnc.runtime.feeds` (input shapes
and feeds), `cnnc.runtime.stats` (summaries, ratios and their bootstrap intervals), `cnnc.runtime.environment` (what
the numbers were measured on) and `cnnc.runtime.peers` (onnxsim / OnnxSlim). The clock is injectable (`timer=`) so
that the statistics and the interleaving are tested on a deterministic clock; no test depends on real speed.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from cnnc.errors import UsageError
from cnnc.runtime.artefacts import OpenVinoIR, load_artefact
from cnnc.runtime.environment import environment
from cnnc.runtime.feeds import concrete_inputs, make_feeds, static_output_shapes
from cnnc.runtime.openvino_cpu import prepare_ir
from cnnc.runtime.peers import peer_models
from cnnc.runtime.session import cuda_available, first_line, make_session
from cnnc.runtime.stats import ratio_to_first, summarize

Timer = Callable[[], float]
SessionFactory = Callable[..., ort.InferenceSession]

DEFAULT_WARMUP = {"cpu": 10, "cuda": 50}  # CUDA: EXHAUSTIVE cuDNN search and clock ramp-up need a longer warm-up
DEFAULT_DURATION_S = 5.0
MIN_ROUNDS = 5  # a duration never gives fewer rounds than this
MAX_ROUNDS = 200_000  # a duration never gives more (microsecond models would fill memory)
MAX_SAMPLES_KEPT = 4000  # per model and comparison, in the report


def interleave(runners: Sequence[Callable[[], Any] | Sequence[Callable[[], Any]]], *, warmup: int,
               iters: int | None = None,
               duration: float | None = None, timer: Timer = time.perf_counter, min_rounds: int = MIN_ROUNDS,
               max_rounds: int = MAX_ROUNDS, rewarm: int = 0, order: str = "shuffled",
               seed: int = 0) -> list[list[float]]:
    """Time `runners` in rounds, each runner once per round: `warmup` untimed rounds, then `iters` rounds, or rounds
    until `duration` seconds have passed (at least `min_rounds`, at most `max_rounds`). Returns seconds per call, per
    runner, in round order (so that sample i of every runner comes from round i: the ratios pair them).

    `order`: "shuffled" (default) runs each timed round in a fresh seeded permutation; "fixed" always in the given
    order (A B C A B C ...). A fixed order gives each model the same position and the same predecessor in every
    round, and that is a bias the rounds cannot average out: three sessions of one identical model, timed A B C,
    measured C 0.991× [0.982, 0.999] as fast as A (mnasnet0_5, 6 s, a run made while writing this, not a committed
    result), "slower with confidence". Shuffling turns the
    position effect into noise, which the interval then covers.

    `warmup` untimed calls per model, spread over its sessions. `rewarm` untimed calls precede each timed call of a
    runner. Each onnxruntime session has its own thread pool;
    right after another model's long call its threads are asleep, and waking them costs ~0.1 ms, which is most of a
    small model's call (a collapsed Gemm: 15 µs hot, 120 µs cold). One re-warm call per turn measures every model
    hot, as a service running it continuously would, while rounds still alternate so drift cancels.

    A runner may be a sequence of callables: several sessions of one model. Round r then calls its (r mod k)-th, so
    every model's sessions take turns and round r's calls all ran on session slot r mod k (`session_slots`), which
    `cnnc.runtime.stats.ratio_to_first(groups=...)` uses to put the session-to-session offset in the interval."""
    if (iters is None) == (duration is None):
        raise UsageError("give either a number of iterations or a duration")
    if iters is not None and iters < 1:
        raise UsageError(f"iterations must be >= 1, got {iters}")
    if duration is not None and duration <= 0:
        raise UsageError(f"duration must be > 0 s, got {duration}")
    if order not in ("shuffled", "fixed"):
        raise UsageError(f"order must be 'shuffled' or 'fixed', got {order!r}")
    sessions = [[runner] if callable(runner) else list(runner) for runner in runners]
    if any(not turns for turns in sessions):
        raise UsageError("every model needs at least one session")
    most = max(len(turns) for turns in sessions)
    if iters is not None and most > 1 and iters < 2 * most:
        raise UsageError(f"{iters} iterations cannot time each of {most} sessions twice: give at least {2 * most}")
    min_rounds = max(min_rounds, 2 * most)  # every session timed twice at least
    for _ in range(-(-max(warmup, 0) // most)):  # `warmup` calls per model, spread over its sessions
        for turns in sessions:
            for run in turns:
                run()
    permutations = np.random.default_rng(seed)
    samples: list[list[float]] = [[] for _ in runners]
    started = timer()
    rounds = 0
    while True:
        if iters is not None:
            if rounds >= iters:
                break
        elif rounds >= max_rounds or (rounds >= min_rounds and timer() - started >= duration):
            break
        sequence = permutations.permutation(len(runners)) if order == "shuffled" else range(len(runners))
        for index in sequence:
            turns = sessions[index]
            run = turns[rounds % len(turns)]
            for _ in range(rewarm):
                run()
            begin = timer()
            run()
            samples[index].append(timer() - begin)
        rounds += 1
    return samples


def session_slots(rounds: int, sessions: int) -> list[int]:
    """The session slot each round of `interleave` ran on, when every model has `sessions` sessions."""
    return [r % sessions for r in range(rounds)]


def create_slot(create: Callable[[int], Any], models: int, slot: int) -> list:
    """Slot `slot`'s sessions, one per model, in model order, created in an order rotated by the slot: where a
    session lands depends on what was created before it, and one fixed order repeats that in every slot, a bias
    the slots' interval cannot see (ghostnet_100, batch 1: the input and its byte-identical copy measured 0.6 % and
    1.4 % apart in two orders). Rotated, it becomes slot-to-slot noise, which the interval holds."""
    made = {index: create(index) for index in ((slot + k) % models for k in range(models))}
    return [made[index] for index in range(models)]


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
    # Explicit either way: make_session turns intra-op spinning off unless told (cnnc.threads says why).
    entries["session.intra_op.allow_spinning"] = "1" if spinning else "0"
    if not spinning:
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


def prepare(model: onnx.ModelProto, label: str, *, provider: str, batch: int | None, input_shapes=None,
            threads: int | None = None, cuda_graph: bool = True, cudnn_conv_algo_search: str = "EXHAUSTIVE",
            denormal_as_zero: bool = True, spinning: bool = False, seed: int = 0, timer: Timer = time.perf_counter,
            session_factory: SessionFactory = make_session) -> PreparedModel:
    """Create `model`'s session on `provider` ("cpu" or "cuda"), bind its inputs, and run it once (timed).

    On CUDA a CUDA-graph session is tried first; if it cannot be used (symbolic output shapes, nodes outside the
    CUDA provider, a capture failure) the plain CUDA session is used and `info["cuda_graph_note"]` says why.
    """
    shapes = concrete_inputs(model, batch, input_shapes)
    feeds = make_feeds(shapes, seed, model)
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
            info["cuda_graph_note"] = f"session refused the CUDA graph: {first_line(error)}"
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
            info["cuda_graph_note"] = f"CUDA graph capture failed: {first_line(error)}"
            continue
        info.update({"provider": actual[0], "providers": list(actual), "device": device,
                     "cuda_graph": bool(graph_mode and device == "cuda"),
                     "session_create_ms": created * 1e3, "first_run_ms": first * 1e3})
        if graph_mode and device == "cuda":
            info["cuda_graph_note"] = "enabled: captured while preparing, replayed on every timed call"
        return PreparedModel(label, run, info, [session, binding, buffers])
    raise RuntimeError(f"no session could be prepared for {label}: {failure}")  # pragma: no cover - loop raises


# ------------------------------------------------------------------------------------------------- benchmark


def _prepare_artefact(model, label: str, **options) -> PreparedModel:
    """`prepare` for a ModelProto; an OpenVINO IR on OpenVINO's CPU plugin (a CPU row, whatever the provider)."""
    if isinstance(model, OpenVinoIR):
        run, info, keep_alive = prepare_ir(model.path, label, options["batch"], options["threads"],
                                           options["seed"], options["timer"])
        return PreparedModel(label, run, info, keep_alive)
    return prepare(model, label, **options)


def _comparison(prepared: list[list[PreparedModel]], samples: list[list[float]], batch: int, seed: int) -> dict:
    """One batch size's entry of the report; `prepared[i]` holds model i's sessions (the first one's info is the
    model's, with every session's creation time)."""
    entries = []
    first = prepared[0][0]
    slots = len(prepared[0])
    groups = session_slots(len(samples[0]), slots) if slots > 1 else None
    for index, (sessions, times) in enumerate(zip(prepared, samples)):
        model = sessions[0]
        if slots > 1:
            model.info["sessions"] = slots
            model.info["session_create_ms_each"] = [s.info.get("session_create_ms") for s in sessions]
        # Statistics use every sample; the report keeps at most MAX_SAMPLES_KEPT of them (every k-th, in round
        # order) for plots, so that microsecond models timed for seconds do not make megabyte reports.
        every = -(-len(times) // MAX_SAMPLES_KEPT)
        while math.gcd(every, slots) > 1:  # kept rounds must still visit every session slot
            every += 1
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
            entry["ratio_to_first"] = ratio_to_first(samples[0], times, seed, groups=groups)
        entries.append(entry)
    return {"title": f"batch {batch}", "batch": batch, "rounds": len(samples[0]), "sessions_per_model": slots,
            "models": entries}


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
                 rewarm: int = 1, sessions: int = 1,
                 timer: Timer = time.perf_counter, session_factory: SessionFactory = make_session,
                 log: Callable[[str], None] | None = None) -> dict:
    """Benchmark `models` against the first one, interleaved, at every batch size in `batch`; returns the report.

    `models`: ModelProtos or ONNX paths; `labels` default to the file names (or model 1, 2, ...). `batch`: one size
    or several (None: the model's own leading dim, 1 when symbolic). `provider`: auto (CUDA when onnxruntime can run
    it, else CPU), cuda or cpu. `warmup` rounds (default 10 on the CPU, 50 on CUDA); then `iters` rounds or
    `duration` seconds (default 5 s) per batch size. `peers` adds onnxsim / OnnxSlim outputs of the first model.
    `sessions` per model (default 1): the rounds rotate over them and the intervals then hold the offset between
    two sessions of one model (`cnnc.runtime.stats`), not only the rounds' noise.

    The report (a JSON-able dict): `environment`, `settings`, `notes`, and one `comparisons` entry per batch size
    with each model's provider, session-creation and first-run times, statistics, samples and ratio to the first.
    """
    if provider not in ("auto", "cuda", "cpu"):
        raise UsageError(f"unknown provider {provider!r}; use auto, cuda or cpu")
    if not models:
        raise UsageError("nothing to benchmark: give at least one model")
    if not isinstance(sessions, int) or sessions < 1:
        raise UsageError(f"sessions per model must be a positive integer, got {sessions!r}")
    if provider == "cuda" and not cuda_available():
        raise UsageError("--provider cuda: no CUDA device or CUDA provider available")
    device_kind = "cuda" if provider == "cuda" or (provider == "auto" and cuda_available()) else "cpu"
    if labels is None:
        labels = [Path(m).name if isinstance(m, (str, Path)) else f"model {i + 1}" for i, m in enumerate(models)]
    labels = list(labels)
    if len(labels) != len(models):
        raise UsageError(f"{len(models)} models but {len(labels)} labels")
    protos = [load_artefact(m) for m in models]  # ONNX, a Triton model folder, or an OpenVINO .xml
    notes: list[str] = []
    if peers:
        if isinstance(protos[0], OpenVinoIR):
            raise UsageError("--peers simplifies the first model: give an ONNX model first")
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
                "interleaved": "one timed call per model per round, in a seeded random order per round",
                "rewarm_calls": rewarm, "seed": seed, "sessions_per_model": sessions}
    env = environment(device_kind)
    comparisons = []
    for size in _batches(batch):
        # Session slot by slot (every model's first session, then every model's second...), so that no model's
        # sessions all sit together in memory; in each slot the models' creation order is rotated (create_slot).
        def create(index: int, size=size) -> PreparedModel:
            return _prepare_artefact(protos[index], labels[index], provider=device_kind, batch=size,
                                     input_shapes=input_shapes, threads=threads, cuda_graph=cuda_graph,
                                     cudnn_conv_algo_search=cudnn_conv_algo_search,
                                     denormal_as_zero=denormal_as_zero, spinning=spinning, seed=seed, timer=timer,
                                     session_factory=session_factory)

        slots = [create_slot(create, len(protos), slot) for slot in range(sessions)]
        prepared = [list(per_model) for per_model in zip(*slots)]
        del slots
        effective = size or next(iter(prepared[0][0].info["inputs"].values()), {"shape": [1]})["shape"][0]
        if log:
            log(f"batch {effective}: timing {', '.join(labels)} interleaved"
                + (f", {sessions} sessions each" if sessions > 1 else ""))
        samples = interleave([[p.run for p in per_model] for per_model in prepared], warmup=warmup, iters=iters,
                             duration=duration, timer=timer, rewarm=rewarm, seed=seed)
        comparisons.append(_comparison(prepared, samples, effective, seed))
        comparisons[-1]["loadavg_1_5_15_after"] = [round(v, 2) for v in os.getloadavg()]
        del prepared  # free the sessions (and device memory) before the next batch size
    env["loadavg_1_5_15_end"] = [round(v, 2) for v in os.getloadavg()]
    settings["devices_used"] = sorted({m["device"] for c in comparisons for m in c["models"]})
    return {"tool": "cnnc bench", "environment": env, "settings": settings, "notes": notes,
            "comparisons": comparisons}
