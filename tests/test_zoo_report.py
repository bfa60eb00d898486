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
    return {"model": "m", "exporter": "torchscript17", "size": 64, "dtype": "fp32", "tools": tools}


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


def _flagged_row(confirmation: dict | None) -> dict:
    """cnnc slower than the original with confidence at b1 (a screen flag), and behind onnxslim."""
    behind = _latency(0.95, 0.94, 0.96)
    behind["1"]["vs_peers"] = {"onnxslim": {"time_ratio": 1.04, "ci95": [1.02, 1.06]}}
    row = _row({"nodes": 170, "identical_to_input": True, "latency": _latency(1.0, 0.99, 1.01)},
               cnnc={"latency": behind})
    if confirmation is not None:
        row["confirmation"] = {"seed": 1000, "sessions": 8, **confirmation}
    return row


def _pairs(cnnc_vs_original: list[float], cnnc_vs_slim: list[float]) -> dict:
    return {"pairs": {"cnnc/original": {"1": {"slots": cnnc_vs_original}},
                      "cnnc/onnxslim": {"1": {"slots": cnnc_vs_slim}}}}


def test_screen_flags_name_what_a_confirmation_must_time():
    row = _flagged_row(None)
    assert sorted(zoo_report.screen_flags(zoo_report.criteria(row))) == ["cnnc never slower b1",
                                                                        "cnnc not behind peers b1"]
    assert zoo_report.needed_for_confirmation(row) == ({"cnnc", "onnxslim"}, {"1"})
    level, flags = zoo_report.family_level({"rows": {"a": row, "b": _flagged_row(None), "c": {"error": "x"}}})
    assert flags == 4 and level == 1 - 0.05 / 4


def test_a_flag_stands_only_when_the_independent_timing_confirms_it_at_the_family_level():
    slower = [1.05, 1.06, 1.04, 1.05, 1.055, 1.045, 1.05, 1.06]  # 5 % slower in every slot: confirmed
    noise = [1.01, 0.99, 1.02, 0.98, 1.0, 1.01, 0.995, 1.005]  # a tie: the screen flag was chance
    row = _flagged_row(_pairs(slower, noise))
    result = zoo_report.score(row, 1 - 0.05 / 4, 4)
    never, peers = result["checks"]["cnnc never slower b1"], result["checks"]["cnnc not behind peers b1"]
    assert never["ok"] is False and never["confirmation"].startswith("CONFIRMED")
    assert peers["ok"] is True and peers["confirmation"].startswith("not reproduced")
    assert [f.split(":")[0] for f in result["failures"]] == ["cnnc never slower b1"]
    # A small but steady shortfall passes 95 % but not the family-wise level when the family is large.
    small = [1.012, 1.006, 1.015, 1.004, 1.01, 1.008, 1.013, 1.005]
    assert zoo_report.score(_flagged_row(_pairs(small, noise)), 1 - 0.05 / 2, 2)["checks"][
        "cnnc never slower b1"]["ok"] is False
    assert zoo_report.score(_flagged_row(_pairs(small, noise)), 1 - 0.05 / 400, 400)["checks"][
        "cnnc never slower b1"]["ok"] is True


def test_without_a_confirmation_the_screen_flag_stands_and_says_why():
    for confirmation in (None, {"error": "RuntimeError: out of memory"}):
        result = zoo_report.score(_flagged_row(confirmation), 0.99, 5)
        check = result["checks"]["cnnc never slower b1"]
        assert check["ok"] is False and check["confirmation"].startswith("not confirmed")
    missing = zoo_report.score(_flagged_row({"pairs": {}}), 0.99, 5)["checks"]["cnnc never slower b1"]
    assert missing["ok"] is False and "not timed" in missing["confirmation"]


def test_score_report_scores_the_run_as_one_family_and_the_page_lists_every_screen_flag():
    report = {"rows": {"m|a": _flagged_row(_pairs([1.05] * 4 + [1.06] * 4, [1.0, 1.01] * 4))}}
    zoo_report.score_report(report)
    zoo_report.score_report(report)  # scoring again (--rescore) counts the screen, not the confirmed flags
    assert report["family"] == {"alpha": 0.05, "screen_flags": 2, "level": 1 - 0.05 / 2}
    assert len(report["rows"]["m|a"]["criteria"]["failures"]) == 1
    page = zoo_report.markdown({**report, "environment": {}})
    assert "## Latency screen: 2 flags" in page and "CONFIRMED" in page and "not reproduced" in page
