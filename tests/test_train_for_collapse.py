"""examples/train_for_collapse.py --quick end to end (issue 14: "a --quick mode that finishes in <= 3 min for the
tests"): both nets trained one seed for two epochs, every variant exported at t = 0, compiled with the default passes
and proven equivalent, timed, and the table, JSON and plot written. Accuracy and speed are the full run's business
(examples/results); here the structure the compile must reach is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_for_collapse.py"


def test_quick_run_compiles_every_variant_equivalently_and_shallower(tmp_path):
    run = subprocess.run([sys.executable, str(EXAMPLE), "--quick", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "train_for_collapse_quick.json").read_text())
    assert (tmp_path / "train_for_collapse_quick.md").is_file() and (tmp_path / "train_for_collapse_quick.png").is_file()
    for net in ("resnet", "mobilenetv2"):
        rows = {r["variant"]: r for r in report["rows"] if r["net"] == net and "accuracy_mean" in r}
        assert {"original", "skip", "skip+act all"} <= set(rows)
        assert all(r["equivalence"].startswith("equivalent") for r in rows.values())
        original, everything = rows["original"], rows["skip+act all"]
        assert everything["depth_after"] == 1 and everything["nodes_after"] <= 2  # Theorem 3.1: one Gemm
        planned = [r for v, r in rows.items() if v.startswith("skip+act plan")]
        assert planned and min(r["depth_after"] for r in planned) < original["depth_after"]
        assert all(set(r["speedup"]) == {"batch 1", "batch 64"} and r["speedup_ci95"] for r in rows.values())
