"""A roofline per execution provider: seconds = max(MACs / peak rate, bytes / bandwidth) + kernels · launch overhead.

The three constants are measured once per machine and provider by micro-benchmarks on onnxruntime (optimisations
off, so that what runs is what was built): a big 3×3 Conv (MAC rate), a big elementwise Add (bandwidth: two reads
and a write) and a chain of tiny Neg ops (the cost of one kernel). Each is timed as the best of a few runs after a
warm-up; the three take about a second on a CPU. The result is cached as JSON in $CNNC_CACHE_DIR (else
~/.cache/cnnc/roofline.json), keyed by CPU model, core count, onnxruntime version and provider.

`roofline(provider, measure=False)` never runs anything: it returns the cached figures when the cache holds them and
otherwise conservative built-in constants (a low bandwidth, so that a rewrite that adds bytes is not credited on a
guess). That is what the passes use, so a compile is deterministic on a given machine and cache; `cnnc inspect
--cost` measures and writes the cache (`measure=True`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort

from cnnc.errors import UsageError
from cnnc.threads import cpu_model

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# Conservative figures: a modest core's fp32 rate, a low share of a memory channel, and onnxruntime's per-node cost.
BUILT_IN = {"cpu": (20e9, 8e9, 4e-6), "cuda": (2e12, 300e9, 12e-6)}
CACHE_NAME = "roofline.json"


@dataclass(frozen=True)
class Roofline:
    provider: str
    macs_per_s: float
    bytes_per_s: float
    kernel_overhead_s: float
    measured: bool
    source: str

    def seconds(self, cost, batch: int = 1) -> float:
        """Estimated seconds of a `cnnc.cost.Cost` at `batch` samples: weights are read once per run."""
        compute = cost.macs * batch / self.macs_per_s
        memory = (cost.weight_bytes + cost.activation_bytes * batch) / self.bytes_per_s
        return max(compute, memory) + cost.kernels * self.kernel_overhead_s

    def as_dict(self) -> dict:
        return asdict(self)


def cache_path() -> Path:
    folder = os.environ.get("CNNC_CACHE_DIR") or Path.home() / ".cache" / "cnnc"
    return Path(folder) / CACHE_NAME


def machine_key(provider: str) -> str:
    return f"{cpu_model()}|{os.cpu_count()} cores|onnxruntime {ort.__version__}|{provider}"


def _read_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, roof: Roofline) -> None:
    path = cache_path()
    entries = _read_cache()
    entries[key] = roof.as_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(entries, indent=2))
    os.replace(temporary, path)  # atomic: a concurrent reader sees the old or the new file, never half of one


def _session(graph: onnx.GraphProto, provider: str) -> ort.InferenceSession:
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=[PROVIDERS[provider]])
    if PROVIDERS[provider] not in session.get_providers():  # onnxruntime fell back to another provider
        raise UsageError(f"onnxruntime cannot run {PROVIDERS[provider]} here (no device?)")
    return session


def _best_seconds(session: ort.InferenceSession, feeds: dict, repeats: int = 5) -> float:
    session.run(None, feeds)  # warm-up: allocations, thread pool
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        best = min(best, time.perf_counter() - start)
    return best


def _value(name: str, shape) -> onnx.ValueInfoProto:
    return oh.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)


def _measure(provider: str) -> Roofline:
    rng = np.random.default_rng(0)
    # MAC rate: 64 -> 64 channels, 3×3, on 1×64×56×56: 115.6 M MACs.
    weight = onnx.numpy_helper.from_array(rng.standard_normal((64, 64, 3, 3)).astype(np.float32), "w")
    conv = oh.make_graph([oh.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "conv",
                         [_value("x", [1, 64, 56, 56])], [_value("y", None)], [weight])
    x = rng.standard_normal((1, 64, 56, 56)).astype(np.float32)
    conv_s = _best_seconds(_session(conv, provider), {"x": x})
    macs_per_s = 64 * 56 * 56 * 64 * 9 / conv_s
    # Bandwidth: an Add of two 4 M-element tensors reads 32 MB and writes 16 MB.
    n = 1 << 22
    add = oh.make_graph([oh.make_node("Add", ["a", "b"], ["c"])], "add", [_value("a", [n]), _value("b", [n])],
                        [_value("c", None)])
    a = rng.standard_normal(n).astype(np.float32)
    add_s = _best_seconds(_session(add, provider), {"a": a, "b": a[::-1].copy()})
    # One kernel: a chain of 64 Neg ops on 16 floats, whose run time is all overhead.
    chain = 64
    negs = [oh.make_node("Neg", [f"t{i}"], [f"t{i + 1}"]) for i in range(chain)]
    tiny = oh.make_graph(negs, "chain", [_value("t0", [16])], [_value(f"t{chain}", None)])
    chain_s = _best_seconds(_session(tiny, provider), {"t0": a[:16].copy()}, repeats=20)
    return Roofline(provider, macs_per_s, 3 * 4 * n / add_s, chain_s / chain, True,
                    f"measured on {machine_key(provider)}")


def built_in(provider: str = "cpu") -> Roofline:
    macs_per_s, bytes_per_s, overhead = BUILT_IN[provider]
    return Roofline(provider, macs_per_s, bytes_per_s, overhead, False, "built-in conservative constants")


def roofline(provider: str = "cpu", *, measure: bool = True) -> Roofline:
    """The roofline of `provider` ("cpu" or "cuda") on this machine: cached figures when there are some; else
    measured and cached when `measure`, else the built-in constants (module docstring)."""
    if provider not in PROVIDERS:
        raise UsageError(f"unknown provider '{provider}' (choose from {', '.join(PROVIDERS)})")
    key = machine_key(provider)
    cached = _read_cache().get(key)
    if isinstance(cached, dict):
        try:
            return Roofline(**{**cached, "source": f"cached in {cache_path()} ({cached.get('source', '')})"})
        except TypeError:
            pass  # written by another version of this module: measure again
    if not measure:
        return built_in(provider)
    if PROVIDERS[provider] not in ort.get_available_providers():
        raise UsageError(f"onnxruntime here has no {PROVIDERS[provider]} to measure")
    roof = _measure(provider)
    _write_cache(key, roof)
    # Passes read this cache from now on: say so where the constants are shown (`cnnc inspect --cost`).
    return dataclasses.replace(roof, source=f"{roof.source}; cached in {cache_path()}, which later compiles use")
