"""Peak resident memory of a compile, per stage, in copies of the weights (issue 16, "Memory").

    python bench/memory.py                        # the ~500 MB BN network (about 1 min on 2 cores)
    python bench/memory.py --models vgg-bn,gemm-2g # and the 2 GiB one-Gemm model (needs ~8 GB free, ~2 min)

Each model is built here with random weights (nothing is downloaded) and written to a temporary folder; the compile
runs in a fresh Python process: warm-up on a one-node model (imports and first-call allocations are not counted),
then `cnnc.compile(path)` with the default pipeline and the equivalence check on, then `CompileResult.save`.
`report["peak_rss"]` gives getrusage's high-water mark after load, passes, emit and check; the save is measured
after it. Figures are above the warmed-up process ("before"), in bytes and in copies of the weight bytes.
Target: peak ≤ 2.0 × weight bytes + 0.5 GB. Where the copies are (2026-11-30): loading holds the file's bytes and
the parsed model at once (2×); the passes hold the original and the weights they made (vgg-bn: 2.3×); the emit moves
those into the compiled model, or copies an untouched weight into it (gemm-2g: 2×); then the original's weights are
let go of (onnxruntime reads the reference from the file), so the check holds the compiled model and one session
(2×), and the save the compiled model and one tensor's bytes (2×).

- `vgg-bn`: a wide VGG-style network, 14 Conv 3x3 (1024 channels after the first) each followed by
  BatchNormalization and Relu, on a 1x3x8x8 input: 491 MB of float32 weights, so fold-bn writes 491 MB of new ones.
- `gemm-2g`: y = x @ W with W 1024 x 514Ki float32 (2.008 GiB) in external data, as tests/test_big_models.py.
Results: bench/results/memory-<date>.{json,md} with the command and the environment.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from cnnc.io.jsonio import write_json, write_text
from cnnc.runtime.environment import environment

RESULTS = Path(__file__).parent / "results"
TARGET_COPIES, TARGET_EXTRA_BYTES = 2.0, 0.5e9


def vgg_bn_model(folder: Path, width: int = 1024, layers: int = 14, seed: int = 0) -> tuple[Path, int]:
    """(path, weight bytes) of the VGG-style BN network described in the module docstring."""
    rng = np.random.default_rng(seed)
    nodes, inits, previous, channels = [], [], "x", 3
    for index in range(layers):
        scale = np.sqrt(2.0 / (9 * channels))
        weight = (rng.standard_normal((width, channels, 3, 3), dtype=np.float32) * scale).astype(np.float32)
        bn = [rng.uniform(0.5, 1.5, width), rng.normal(0, 0.1, width), rng.normal(0, 0.1, width),
              rng.uniform(0.5, 1.5, width)]
        names = [f"w{index}", f"g{index}", f"b{index}", f"m{index}", f"v{index}"]
        inits += [nh.from_array(weight, names[0])] + [nh.from_array(v.astype(np.float32), n)
                                                      for v, n in zip(bn, names[1:])]
        nodes += [oh.make_node("Conv", [previous, names[0]], [f"c{index}"], pads=[1, 1, 1, 1], name=f"conv{index}"),
                  oh.make_node("BatchNormalization", [f"c{index}"] + names[1:], [f"n{index}"], name=f"bn{index}"),
                  oh.make_node("Relu", [f"n{index}"], [f"r{index}"], name=f"relu{index}")]
        previous, channels = f"r{index}", width
    nodes.append(oh.make_node("ReduceMean", [previous], ["y"], axes=[2, 3], keepdims=0, name="pool"))
    graph = oh.make_graph(nodes, "vgg_bn", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], initializer=inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    weight_bytes = sum(t.ByteSize() for t in inits)
    path = folder / "vgg_bn.onnx"
    onnx.save(model, path)
    return path, weight_bytes


def gemm_model(folder: Path, k: int = 1024, n: int = 514 * 1024) -> tuple[Path, int]:
    """(path, weight bytes) of y = x @ W, W[r, c] = ((r + c) mod 7 − 3)/8 in external data written row by row."""
    columns = np.arange(n, dtype=np.int64)
    with open(folder / "weights.bin", "wb") as data:
        data.writelines((((row + columns) % 7 - 3) / 8).astype(np.float32).tobytes() for row in range(k))
    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[k, n], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", str(k * n * 4))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = oh.make_graph([oh.make_node("Gemm", ["x", "W"], ["y"], name="gemm")], "big",
                          [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])], initializer=[weight])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "gemm.onnx"
    onnx.save(model, path)
    return path, k * n * 4


MODELS = {"vgg-bn": vgg_bn_model, "gemm-2g": gemm_model}

MEASURE = """
import json, resource, sys, tempfile, time
import onnx, onnx.helper as oh
import cnnc
from cnnc.api import peak_rss_bytes

tiny = oh.make_model(oh.make_graph([oh.make_node("Relu", ["x"], ["y"])], "tiny",
                                   [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                                   [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])]),
                     opset_imports=[oh.make_opsetid("", 17)])
tiny.ir_version = 8
with tempfile.TemporaryDirectory() as folder:
    cnnc.compile(tiny).save(folder + "/tiny.onnx", external_data=True)
before = peak_rss_bytes()
started = time.perf_counter()
result = cnnc.compile(sys.argv[1])
result.save(sys.argv[2])
print(json.dumps({"before": before, "stages": {**result.report["peak_rss"], "save": peak_rss_bytes()},
                  "seconds": round(time.perf_counter() - started, 1),
                  "equivalence": result.report["equivalence"]["summary"],
                  "passes": [r["pass"] for r in result.report["passes"] if r.get("changed")]}))
"""


def measure(name: str) -> dict:
    """Build in one fresh process, compile in another: Linux carries ru_maxrss across exec, so a process started by
    one that held the model would report that process's peak as its own."""
    with tempfile.TemporaryDirectory(prefix="cnnc-memory-") as folder:
        built = subprocess.run([sys.executable, __file__, "--build", name, folder], capture_output=True, text=True,
                               check=True)
        path, weight_bytes = built.stdout.split()[-2], int(built.stdout.split()[-1])
        done = subprocess.run([sys.executable, "-c", MEASURE, path, str(Path(folder) / "out.onnx")],
                              check=False, capture_output=True, text=True, cwd=folder)
    if done.returncode != 0:
        return {"model": name, "weight_bytes": weight_bytes, "error": done.stderr.strip().splitlines()[-1]}
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    above = {stage: value - figures["before"] for stage, value in figures["stages"].items() if stage != "start"}
    peak = max(above.values())
    return {"model": name, "weight_bytes": weight_bytes, "before_bytes": figures["before"], "above_bytes": above,
            "copies": {stage: round(value / weight_bytes, 2) for stage, value in above.items()},
            "peak_bytes": peak, "peak_copies": round(peak / weight_bytes, 2),
            "target_bytes": int(TARGET_COPIES * weight_bytes + TARGET_EXTRA_BYTES),
            "within_target": peak <= TARGET_COPIES * weight_bytes + TARGET_EXTRA_BYTES,
            "seconds": figures["seconds"], "equivalence": figures["equivalence"], "passes": figures["passes"]}


def markdown(rows: list[dict], command: str, env: dict) -> str:
    lines = [f"# Peak RSS of a compile ({datetime.date.today()})", "", f"`{command}`", "",
             f"Environment: {json.dumps(env)}", "",
             ("Peak resident memory above the warmed-up process, after each stage (getrusage high-water mark), in "
              "copies of the weight bytes; target ≤ 2.0 × weights + 0.5 GB."), "",
             "| model | weights | load | passes | emit | check | save | peak | target | within | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['weight_bytes'] / 1e6:.0f} MB | error: {row['error']} |")
            continue
        copies = row["copies"]
        lines.append(f"| {row['model']} | {row['weight_bytes'] / 1e6:.0f} MB | "
                     + " | ".join(f"{copies[s]:.2f}×" for s in ("load", "passes", "emit", "check", "save"))
                     + f" | {row['peak_bytes'] / 1e9:.2f} GB ({row['peak_copies']:.2f}×) | "
                     f"{row['target_bytes'] / 1e9:.2f} GB | {'yes' if row['within_target'] else 'no'} | "
                     f"{row['seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg-bn", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--build", nargs=2, metavar=("MODEL", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:  # the child that writes a model (see measure)
        path, weight_bytes = MODELS[args.build[0]](Path(args.build[1]))
        print(path, weight_bytes)
        return
    rows = []
    for name in args.models.split(","):
        rows.append(measure(name))
        print(json.dumps(rows[-1]), flush=True)
    command = "python bench/memory.py " + " ".join(sys.argv[1:])
    env = {**environment("cpu"), "memory_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    stem = f"memory-{datetime.date.today()}" + (f"-{args.tag}" if args.tag else "")
    write_json(RESULTS / f"{stem}.json", {"command": command, "environment": env, "results": rows})
    write_text(RESULTS / f"{stem}.md", markdown(rows, command, env))
    print(markdown(rows, command, env))


if __name__ == "__main__":
    main()
