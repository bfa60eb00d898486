"""onnx's backend node tests (single-op models with expected outputs) through `cnnc.compile`, and the verdict.

onnx 1.23's `python -m onnx.backend.test.cmd_tools generate-data -o DIR` writes only the model tests (`real/`,
`simple/`); the node tests' data no longer ships in the wheel. `generate_node_tests` writes the node tests in the
same layout that `generate-data` uses (DIR/node/<name>/model.onnx and test_data_set_0/input_<j>.pb, output_<j>.pb),
from `onnx.backend.test.case.node.collect_testcases()`, the generators behind onnx's own data. Used by
tests/test_onnx_node_tests.py (a fixed sample) and bench/onnx_node_tests.py (all of them).

`classify(folder)` runs one model: onnxruntime first (CPU, optimisations off; an IR version newer than it loads
stamped down as cnnc stamps it, `cnnc.io.target.runnable`) against the expected outputs at
onnx's node-test tolerance (rtol 1e-3, atol 1e-7); a model onnxruntime fails or gets wrong is out of scope
("ort-fails", "ort-wrong"). Then `cnnc.compile` with the default passes, and the compiled model on the same
inputs against the expected outputs: "ok" (proven and matches), "wrong" (proven but differs from the expected
outputs), "equivalence-failure" (EquivalenceError), "refused" (ModelError or UsageError: a reason in one
sentence), "crash" (anything else). Anything the compile writes to stdout or stderr is recorded as `leaked`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.backend.test.case import node as node_cases

import cnnc
from cnnc.errors import EquivalenceError, ModelError, UsageError
from cnnc.io.target import runnable
from cnnc.runtime.session import make_session

RTOL, ATOL = 1e-3, 1e-7  # onnx's node-test tolerance (onnx.backend.test.case.node.expect)
VERDICTS = ("ok", "wrong", "equivalence-failure", "refused", "crash", "ort-fails", "ort-wrong", "non-tensor")


def generate_node_tests(out: Path, only: set[str] | None = None) -> list[str]:
    """Write every node test (or those named in `only`) under out/node/<name>/ as `generate-data` lays out model
    tests; returns the names written. onnx collects the cases once per process (its generators register each name
    once), so later calls reuse that collection."""
    names = []
    for case in _collected():
        if only is not None and case.name not in only:
            continue
        folder = Path(out) / "node" / case.name
        data = folder / "test_data_set_0"
        data.mkdir(parents=True, exist_ok=True)
        (folder / "model.onnx").write_bytes(case.model.SerializeToString())
        inputs, outputs = case.data_sets[0]
        for kind, values, infos in (("input", inputs, case.model.graph.input),
                                    ("output", outputs, case.model.graph.output)):
            for j, (value, info) in enumerate(zip(values, infos)):
                (data / f"{kind}_{j}.pb").write_bytes(_serialise(value, info).SerializeToString())
        names.append(case.name)
    return names


@functools.cache
def _collected() -> tuple:
    return tuple(node_cases.collect_testcases())


def _serialise(value, info: onnx.ValueInfoProto):
    if info.type.HasField("sequence_type"):
        return numpy_helper.from_list(value, info.name)
    if info.type.HasField("optional_type"):
        return numpy_helper.from_optional(value, info.name)
    if info.type.HasField("map_type"):
        return numpy_helper.from_dict(value, info.name)
    return value if isinstance(value, onnx.TensorProto) else numpy_helper.from_array(np.asarray(value), info.name)


@dataclass
class Verdict:
    name: str
    verdict: str
    reason: str = ""
    op: str = ""
    leaked: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in ("", {})}


def _load_tensors(folder: Path, kind: str, infos) -> list[np.ndarray]:
    values = []
    for j, _ in enumerate(infos):
        tensor = onnx.TensorProto()
        tensor.ParseFromString((folder / "test_data_set_0" / f"{kind}_{j}.pb").read_bytes())
        values.append(numpy_helper.to_array(tensor))
    return values


def _matches(expected: list[np.ndarray], got: list) -> bool:
    for want, have in zip(expected, got):
        have = np.asarray(have)
        if want.shape != have.shape:
            return False
        if want.dtype.kind in "fc" or have.dtype.kind in "fc":
            if not np.allclose(have.astype(np.float64), want.astype(np.float64), rtol=RTOL, atol=ATOL,
                               equal_nan=True):
                return False
        elif not np.array_equal(want, have):
            return False
    return len(expected) == len(got)


def _run(model: onnx.ModelProto, feed: dict) -> list:
    session = make_session(model, "cpu", "disabled")
    return session.run([o.name for o in model.graph.output], feed)


@contextlib.contextmanager
def captured_fds():
    """Capture what is written to file descriptors 1 and 2 (C++ and Python alike); yields a list that receives it."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    box: list[str] = []
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield box
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            box.append(sink.read().decode(errors="replace"))


def classify(folder: Path) -> Verdict:
    """The verdict of one node test (see the module docstring)."""
    folder = Path(folder)
    model = onnx.load(folder / "model.onnx")
    verdict = Verdict(folder.name, "", op=model.graph.node[0].op_type if model.graph.node else "")
    if not all(v.type.HasField("tensor_type") for v in list(model.graph.input) + list(model.graph.output)):
        verdict.verdict = "non-tensor"
        return verdict
    inputs = _load_tensors(folder, "input", model.graph.input)
    expected = _load_tensors(folder, "output", model.graph.output)
    feed = {info.name: value for info, value in zip(model.graph.input, inputs)}
    try:
        # Stamped as cnnc stamps it: a newer IR version than onnxruntime loads is the only change cnnc makes first.
        reference = _run(runnable(model), feed)
    except Exception as error:  # noqa: BLE001 - onnxruntime's own exception types
        verdict.verdict, verdict.reason = "ort-fails", str(error).strip().splitlines()[0][:200]
        return verdict
    if runnable(model) is not model:
        verdict.extra["stamped"] = True
    if not _matches(expected, reference):
        verdict.verdict = "ort-wrong"
        return verdict
    with captured_fds() as leaked:
        try:
            result = cnnc.compile(model)
        except EquivalenceError as error:
            verdict.verdict, verdict.reason = "equivalence-failure", str(error)
        except (ModelError, UsageError) as error:
            verdict.verdict, verdict.reason = "refused", str(error)
        except Exception as error:  # noqa: BLE001 - a crash is what this harness looks for
            verdict.verdict, verdict.reason = "crash", f"{type(error).__name__}: {error}"
    verdict.leaked = leaked[0].strip()[:300]
    if verdict.verdict:
        return verdict
    try:
        got = _run(result.model, feed)
    except Exception as error:  # noqa: BLE001
        verdict.verdict, verdict.reason = "wrong", f"compiled model fails on the test data: {error}"[:300]
        return verdict
    verdict.verdict = "ok" if _matches(expected, got) else "wrong"
    unchanged = (result.report.get("equivalence") or {}).get("unchanged")
    verdict.extra["equivalence"] = "unchanged" if unchanged else "proven"
    return verdict


def reason_group(reason: str) -> str:
    """A refusal reason with names and numbers blanked, to group refusals of the same kind."""
    text = re.sub(r"'[^']*'", "'…'", reason)
    text = re.sub(r"\b\d+\b", "N", text)
    return text[:160]
