"""bench/zoo_report.py's verdicts on hand-made rows: the done-when criteria of issue 13 as the zoo bench scores them
(speedups > 1: faster; intervals as the bench stores them)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/ holds scripts, not a package

import zoo_report


def _latency(speedup: float, low: float, high: float, rounds: int = 60) -> dict:
    return {"1": {"speedup": speedup, "ci95": [low, high], "rounds": rounds, "p50_ms": 1.0}}


def _row(auto: dict, cnnc: dict | None = None, slim_speedup: float = 1.0) -> dict:
    tools = [
        {"tool": "original", "nodes": 170, "bytes": 1000, "latency": _latency(1.0, 1.0, 1.0)},
        {"tool": zoo_report.AA_CONTROL, "latency": _latency(1.0, 0.99, 1.01)},
        {"tool": "cnnc", "nodes": 100, "bytes": 1000, "compile_s": 1.0, "equivalent": True,
         "latency": _latency(1.0, 0.98, 1.02), **(cnnc or {})},
        {"tool": "cnnc-auto", "bytes": 1000, "compile_s": 5.0, "equivalent": True, **auto},
        {"tool": "onnxslim", "nodes": 100, "bytes": 1001, "compile_s": 0.2,
         "latency": _latency(slim_speedup, slim_speedup - 0.01, slim_speedup + 0.01)},
    ]
    return {"model": "m", "size": 64, "tools": tools}


def test_auto_emitting_the_input_unchanged_is_one_by_identity_and_its_node_count_is_not_applicable():
    row = _row({"nodes": 170, "identical_to_input": True, "latency": _latency(0.993, 0.98, 1.01)})
    checks = zoo_report.criteria(row)["checks"]
    assert checks["cnnc-auto median >= 1 b1"]["ok"] is True
    assert "1 by identity; measured 0.993" in checks["cnnc-auto median >= 1 b1"]["detail"]
    assert checks["cnnc-auto nodes <= onnxslim"]["ok"] is None
    assert checks["cnnc nodes <= onnxslim"]["ok"] is True
    assert checks["cnnc never slower b1"]["ok"] is True


def test_a_rewrite_emitted_by_auto_is_held_to_its_measured_median_and_to_onnxslims_nodes():
    row = _row({"nodes": 120, "identical_to_input": False, "latency": _latency(0.993, 0.98, 1.01)})
    result = zoo_report.criteria(row)
    assert result["checks"]["cnnc-auto median >= 1 b1"]["ok"] is False
    assert result["checks"]["cnnc-auto nodes <= onnxslim"]["ok"] is False
    assert any(f.startswith("cnnc-auto median >= 1 b1") for f in result["failures"])


def test_behind_a_peer_means_the_peer_is_faster_with_confidence_on_the_paired_interval():
    def vs(low: float, high: float) -> dict:
        return {"onnxslim": {"time_ratio": (low + high) / 2, "ci95": [low, high]},
                "onnxsim": {"time_ratio": 1.0, "ci95": [0.98, 1.02]}}

    behind = _latency(0.95, 0.94, 0.96)
    behind["1"]["vs_peers"] = vs(1.02, 1.06)  # onnxslim faster with confidence
    level = _latency(1.0, 0.98, 1.02)
    level["1"]["vs_peers"] = vs(0.99, 1.03)  # the interval reaches 1: within the noise
    row = _row({"nodes": 100, "latency": level}, cnnc={"latency": behind})
    checks = zoo_report.criteria(row)["checks"]
    assert checks["cnnc never slower b1"]["ok"] is False
    assert checks["cnnc not behind peers b1"]["ok"] is False
    assert "onnxslim's 1.040 [1.020, 1.060]" in checks["cnnc not behind peers b1"]["detail"]
    assert checks["cnnc-auto not behind peers b1"]["ok"] is True
    unpaired = zoo_report.criteria(_row({"nodes": 100, "latency": _latency(1.0, 0.99, 1.01)}))["checks"]
    assert unpaired["cnnc not behind peers b1"]["ok"] is None  # timed, but without the paired intervals
    assert "not scored" in unpaired["cnnc not behind peers b1"]["detail"]
