"""Proving that a compiled model computes the same function as the original (ARCHITECTURE.md, runtime).

The reference is the original on onnxruntime's CPU provider with graph optimisations disabled, so that ORT's own
fusions neither hide nor cause a difference; the candidate runs the same way. Outputs are matched by name and order.
An output passes when max|candidate − reference| ≤ atol + rtol·max|reference| on every checked batch: the
tolerance is relative to the output's scale, not to each element. An elementwise rule (numpy's allclose)
flags float32 rounding on near-zero elements of deep networks: two float32 evaluations of a ResNet-50 differ by
about 1e-4 of max|y| on elements that are themselves near 0, whichever of them is closer to the exact function.

rtol and atol follow each output's dtype (`cnnc.io.precision.precision_tolerance`: float32 1e-4/1e-5, float16
2e-2/2e-3, bfloat16 5e-2/5e-3, float64 1e-9/1e-11, integers and bool exact). The dtype is the least precise of the
reference's output, the candidate's output and `compute_dtype`, the type the candidate computes in when its
outputs do not show it (a float16 model with float32 inputs and outputs). A user's rtol/atol replace the table
for every dtype. When an input of the candidate has a less precise type than the reference's (float16 against
float32), the seeded input is rounded to it first and both models get the same values.

The report gives per output its dtype and tolerance, the max/mean absolute error, the max error relative to
max|reference|, and the smallest atol that would pass at that rtol.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from cnnc.errors import EquivalenceError, ModelError
from cnnc.io.precision import Tolerance, dtype_name, is_float, looser, precision_tolerance
from cnnc.runtime.inputs import make_input_batches
from cnnc.runtime.ort_errors import ort_reason
from cnnc.runtime.parameter_inputs import parameter_roles, unknown_parameter_inputs
from cnnc.runtime.session import make_session

FLOAT16_OVERFLOW_HINT = "float16 holds no value beyond ±65504: an activation or weight overflows"


@dataclass
class OutputError:
    name: str
    dtype: str = "float32"  # the dtype whose tolerance applies (see the module docstring)
    rtol: float = 0.0
    atol: float = 0.0
    max_abs: float = 0.0
    mean_abs: float = 0.0
    max_rel: float = 0.0  # max |a - b| / max |reference|
    needed_atol: float = 0.0
    nonfinite_mismatch: bool = False
    passed: bool = True
    # Running totals over every feed, so that mean_abs is the mean of all compared values, not of one feed.
    _abs_sum: float = 0.0
    _abs_count: int = 0

    def as_dict(self) -> dict:
        return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in self.__dict__.items()
                if not k.startswith("_")}

    def tolerance_text(self) -> str:
        return f"{self.dtype}: rtol {self.rtol:g}, atol {self.atol:g}"


@dataclass
class EquivalenceReport:
    rtol: float | None  # the user's override for every dtype; None: per dtype (OutputError.rtol)
    atol: float | None
    feeds: int
    compute_dtype: str | None = None
    shapes: list = field(default_factory=list)
    outputs: list[OutputError] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(out.passed for out in self.outputs)

    def as_dict(self) -> dict:
        return {"passed": self.passed, "rtol": self.rtol, "atol": self.atol, "compute_dtype": self.compute_dtype,
                "tolerance": "given" if self.rtol is not None or self.atol is not None else "per dtype",
                "feeds": self.feeds, "input_shapes": self.shapes, "outputs": [out.as_dict() for out in self.outputs]}

    def summary(self) -> str:
        verdict = "equivalent" if self.passed else "NOT equivalent"
        if not self.outputs:
            return verdict
        failed = [out for out in self.outputs if not out.passed]
        worst = max(failed or self.outputs, key=lambda o: o.max_rel)
        tolerances = dict.fromkeys(out.tolerance_text() for out in self.outputs)  # in output order, once each
        line = (f"{verdict} on {self.feeds} input batch(es): max abs err {worst.max_abs:.3g}, "
                f"max rel err {worst.max_rel:.3g} ({'; '.join(tolerances)})")
        if self.compute_dtype:
            line += f", computed in {self.compute_dtype}"
        for out in (o for o in self.outputs if o.nonfinite_mismatch):
            line += f"; output '{out.name}' has NaN or Inf where the original has not (or the reverse)"
            if "float16" in (out.dtype, self.compute_dtype):
                line += f": {FLOAT16_OVERFLOW_HINT}"
        return line


def output_tolerance(reference_dtype, candidate_dtype, compute_dtype=None, rtol: float | None = None,
                     atol: float | None = None) -> Tolerance:
    """The tolerance of one output: the loosest of its dtypes' (floats only), or the user's rtol/atol."""
    dtypes = [reference_dtype, candidate_dtype]
    if compute_dtype is not None and all(is_float(d) for d in dtypes):
        dtypes.append(compute_dtype)
    default = looser(*(precision_tolerance(d) for d in dtypes))
    return Tolerance(default.rtol if rtol is None else rtol, default.atol if atol is None else atol, default.dtype)


def _compare(error: OutputError, reference: np.ndarray, candidate: np.ndarray) -> None:
    if reference.shape != candidate.shape:
        raise EquivalenceError(f"output '{error.name}' has shape {candidate.shape}, the original {reference.shape}")
    rtol, atol = error.rtol, error.atol
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    if not (is_float(reference.dtype) or is_float(candidate.dtype)) and rtol == 0 and atol == 0:
        # Integers and bool, exactly: through float64, int64 values beyond 2^53 would compare equal when they differ.
        error.passed = error.passed and np.array_equal(reference, candidate)
    finite = np.isfinite(ref) & np.isfinite(cand)
    ref_inf, cand_inf = np.isinf(ref), np.isinf(cand)
    # NaN and ±Inf must appear in the same places with the same values; everything else is compared numerically.
    if not (np.array_equal(np.isnan(ref), np.isnan(cand)) and np.array_equal(ref_inf, cand_inf)
            and np.array_equal(ref[ref_inf], cand[ref_inf])):
        error.nonfinite_mismatch = True
        error.passed = False
    diff = np.abs(ref[finite] - cand[finite])  # inf − inf would warn (on the CLI's stderr) and give NaN
    if diff.size:
        scale = float(np.max(np.abs(ref[finite])))
        error.max_abs = max(error.max_abs, float(diff.max()))
        error._abs_sum += float(diff.sum())
        error._abs_count += diff.size
        error.mean_abs = error._abs_sum / error._abs_count
        error.max_rel = max(error.max_rel, float(diff.max()) / scale if scale > 0 else float(diff.max()))
        error.needed_atol = max(error.needed_atol, float(diff.max()) - rtol * scale)
        if diff.max() > atol + rtol * scale:
            error.passed = False


def _feed_pair(feed: dict[str, np.ndarray], candidate_types: dict[str, np.dtype]) -> tuple[dict, dict]:
    """(reference feed, candidate feed): a float input the candidate takes in another float type is rounded to
    that type, and the reference gets the rounded values back in its own type, so both see the same numbers."""
    reference_feed, candidate_feed = dict(feed), {}
    for name, value in feed.items():
        if name not in candidate_types:
            continue
        wanted = candidate_types[name]
        if wanted is not None and wanted != value.dtype and is_float(wanted) and is_float(value.dtype):
            candidate_feed[name] = value.astype(wanted)
            reference_feed[name] = candidate_feed[name].astype(value.dtype)
        else:
            candidate_feed[name] = value
    return reference_feed, candidate_feed


def _input_types(model: onnx.ModelProto) -> dict[str, np.dtype | None]:
    types = {}
    for value in model.graph.input:
        elem = value.type.tensor_type.elem_type
        types[value.name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)) if elem else None
    return types


def _output_types(model: onnx.ModelProto) -> list[str | None]:
    return [dtype_name(onnx.helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type))
            if o.type.tensor_type.elem_type else None for o in model.graph.output]


def check_input_failure(reference: onnx.ModelProto, error: Exception, given: bool) -> str:
    """One sentence for an original that fails on its check input: onnxruntime's reason, and what the user can do
    (the inputs whose valid values cnnc cannot derive from an op's constraints, named)."""
    reason = ort_reason(error)
    if given:
        return f"the original model fails on the given inputs ({reason})"
    unknown = unknown_parameter_inputs(reference, parameter_roles(reference))
    if unknown:
        return (f"the original model fails on made-up values of input {', '.join(unknown)}, whose valid values cnnc "
                f"cannot derive ({reason}); give valid ones with inputs= (--inputs name:file.npy)")
    return (f"the original model fails on its made-up check input ({reason}); give inputs it accepts with inputs= "
            f"(--inputs name:file.npy)")


def check_equivalence(reference: onnx.ModelProto, candidate: onnx.ModelProto, n: int = 2, seed: int = 0,
                      rtol: float | None = None, atol: float | None = None, input_shapes=None, user_inputs=None,
                      compute_dtype: str | None = None, provider: str = "cpu",
                      reference_path: str | None = None, dtype_change: bool = False) -> EquivalenceReport:
    """Run both models on the same seeded inputs and compare every output, each at its dtype's tolerance.

    `rtol`/`atol` (when given) replace the per-dtype defaults for every output; `compute_dtype` ("float16") is the
    type the candidate computes in when its outputs do not show it. `provider` is where the candidate runs (the
    reference always runs on the CPU). Differing values are reported (`report.passed`), never raised; a structural
    mismatch (other output names or shapes, or a candidate that fails on an input the original accepts) raises
    EquivalenceError.

    Memory: the candidate's session is opened only after the reference has run on every feed and its session is
    gone, so that at most one of them holds the weights; `reference_path` (the file `reference` was read from,
    unchanged) lets onnxruntime read the reference from disk instead of from a serialized copy of the proto.
    """
    cand_names = [o.name for o in candidate.graph.output]
    sessions = {}

    def open_candidate() -> None:
        sessions["candidate"] = make_session(candidate, provider, "disabled")

    # What onnxruntime lets a caller feed: the graph inputs (with IR >= 4 an input with an initializer is an
    # overridable one; before IR 4 every initializer is listed among the inputs and is a constant).
    constants = {t.name for t in candidate.graph.initializer} if candidate.ir_version < 4 else set()
    fed = {value.name for value in candidate.graph.input} - constants
    candidate_side = CandidateRunner(
        run=lambda feed: sessions["candidate"].run(cand_names, feed), output_names=cand_names,
        input_types={name: dtype for name, dtype in _input_types(candidate).items() if name in fed},
        output_types=_output_types(candidate), prepare=open_candidate)
    return check_runner(reference, candidate_side, n=n, seed=seed, rtol=rtol, atol=atol, input_shapes=input_shapes,
                        user_inputs=user_inputs, compute_dtype=compute_dtype, reference_path=reference_path,
                        dtype_change=dtype_change)


@dataclass
class CandidateRunner:
    """A candidate on any runtime (onnxruntime, OpenVINO, TensorRT): `run(feed)` returns its outputs in the order
    of `output_names`; `input_types` are the dtypes it takes (a float input of a less precise type gets the
    seeded values rounded to it, and the reference the same rounded values); `output_types` its outputs' dtypes
    (None: unknown, the reference's)."""

    run: Callable[[dict[str, np.ndarray]], list]
    output_names: list[str]
    input_types: dict[str, np.dtype | None]
    output_types: list[str | None]
    prepare: Callable[[], None] | None = None  # called once before the first run (opens a session lazily)


def check_runner(reference: onnx.ModelProto, candidate: CandidateRunner, n: int = 2, seed: int = 0,
                 rtol: float | None = None, atol: float | None = None, input_shapes=None, user_inputs=None,
                 compute_dtype: str | None = None, reference_path: str | None = None,
                 dtype_change: bool = False) -> EquivalenceReport:
    """`check_equivalence` against a candidate that runs anywhere: the reference on onnxruntime's CPU provider with
    optimisations off, the same seeded inputs (`make_input_batches`), the same per-dtype rules. The reference runs
    on every feed first and its session is closed before `candidate.prepare`."""
    ref_names = [o.name for o in reference.graph.output]
    cand_names = list(candidate.output_names)
    if ref_names != cand_names:
        raise EquivalenceError(f"outputs differ: original {ref_names}, compiled {cand_names}")
    feeds = make_input_batches(reference, n=n, seed=seed, input_shapes=input_shapes, user_inputs=user_inputs)
    ref_session = make_session(reference_path if reference_path is not None else reference, "cpu", "disabled")
    compute = dtype_name(compute_dtype) if compute_dtype is not None else None
    report = EquivalenceReport(rtol=rtol, atol=atol, feeds=len(feeds), compute_dtype=compute)
    for name, ref_type, cand_type in zip(ref_names, _output_types(reference), candidate.output_types):
        if not (compute or dtype_change) and ref_type and cand_type and dtype_name(ref_type) != dtype_name(cand_type):
            # A rewrite may not change an output's type: judging it at the looser dtype's tolerance would let a
            # float32 output turned float16 pass. Only a deliberate conversion (compute_dtype) may, or a comparison
            # of two models the user chose (`cnnc verify`: dtype_change).
            raise EquivalenceError(f"output '{name}' is {dtype_name(cand_type)} in the compiled model, "
                                   f"{dtype_name(ref_type)} in the original")
        tolerance = output_tolerance(ref_type or cand_type or "float32", cand_type or ref_type or "float32",
                                     compute, rtol, atol)
        report.outputs.append(OutputError(name, tolerance.dtype, tolerance.rtol, tolerance.atol))
    pairs = [_feed_pair(feed, candidate.input_types) for feed in feeds]
    expected_per_feed = []
    for feed, (ref_feed, _) in zip(feeds, pairs):
        report.shapes.append({name: list(value.shape) for name, value in feed.items()})
        try:
            expected_per_feed.append(ref_session.run(ref_names, ref_feed))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception hierarchy
            raise ModelError(check_input_failure(reference, exc, bool(user_inputs))) from None
    del ref_session  # its weights go before the candidate's come
    if candidate.prepare is not None:
        candidate.prepare()
    for feed, (_, cand_feed), expected in zip(feeds, pairs, expected_per_feed):
        try:
            got = candidate.run(cand_feed)
        except Exception as exc:  # noqa: BLE001 - e.g. a rewrite that hard-codes batch 1 fails at batch 3
            shapes = {name: list(value.shape) for name, value in feed.items()}
            raise EquivalenceError(f"the compiled model fails on an input the original accepts ({shapes}): "
                                   f"{ort_reason(exc)}") from None
        for error, a, b in zip(report.outputs, expected, got):
            _compare(error, np.asarray(a), np.asarray(b))
    return report
