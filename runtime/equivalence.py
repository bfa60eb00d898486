"""Proving that a compiled model computes the same function as the original (ARCHITECTURE.md, runtime).

The reference is the original on onnxruntime's CPU provider with graph optimisations disabled, so that ORT's own
fusions neither hide nor cause a difference; the candidate runs the same way. Outputs are matched by name and order.
An output passes when max|candidate − reference| ≤ atol + rtol·max|reference| on every checked batch: the
tolerance is relative to the output's scale, not to each element. An elementwise rule (numpy's allclose)
flags float32 rounding on near-zero elements of deep networks: two float32 evaluations of a ResNet-50 differ by
about 1e-4 of max|y| on elements that are themselves near 0, whichever of them is closer to the exact function.
The report gives per output the max/mean absolute error, the max error relative to max|reference|, and the
smallest atol that would pass at the given rtol.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from cnnc.errors import EquivalenceError, ModelError
from cnnc.runtime.inputs import make_input_batches
from cnnc.runtime.session import make_session

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5


@dataclass
class OutputError:
    name: str
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


@dataclass
class EquivalenceReport:
    rtol: float
    atol: float
    feeds: int
    shapes: list = field(default_factory=list)
    outputs: list[OutputError] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(out.passed for out in self.outputs)

    def as_dict(self) -> dict:
        return {"passed": self.passed, "rtol": self.rtol, "atol": self.atol, "feeds": self.feeds,
                "input_shapes": self.shapes, "outputs": [out.as_dict() for out in self.outputs]}

    def summary(self) -> str:
        worst = max(self.outputs, key=lambda o: o.max_abs, default=None)
        verdict = "equivalent" if self.passed else "NOT equivalent"
        if worst is None:
            return verdict
        return (f"{verdict} on {self.feeds} input batch(es): max abs err {worst.max_abs:.3g}, "
                f"max rel err {worst.max_rel:.3g} (rtol {self.rtol:g}, atol {self.atol:g})")


def _compare(error: OutputError, reference: np.ndarray, candidate: np.ndarray, rtol: float, atol: float) -> None:
    if reference.shape != candidate.shape:
        raise EquivalenceError(f"output '{error.name}' has shape {candidate.shape}, the original {reference.shape}")
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
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


def check_equivalence(reference: onnx.ModelProto, candidate: onnx.ModelProto, n: int = 2, seed: int = 0,
                      rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL, input_shapes=None,
                      user_inputs=None) -> EquivalenceReport:
    """Run both models on the same seeded inputs and compare every output.

    Differing values are reported (`report.passed`), never raised; a structural mismatch (other output names or
    shapes, or a candidate that fails on an input the original accepts) raises EquivalenceError.
    """
    ref_names = [o.name for o in reference.graph.output]
    cand_names = [o.name for o in candidate.graph.output]
    if ref_names != cand_names:
        raise EquivalenceError(f"outputs differ: original {ref_names}, compiled {cand_names}")
    feeds = make_input_batches(reference, n=n, seed=seed, input_shapes=input_shapes, user_inputs=user_inputs)
    ref_session = make_session(reference, "cpu", "disabled")
    cand_session = make_session(candidate, "cpu", "disabled")
    cand_inputs = {i.name for i in cand_session.get_inputs()}
    report = EquivalenceReport(rtol=rtol, atol=atol, feeds=len(feeds))
    report.outputs = [OutputError(name) for name in ref_names]
    for feed in feeds:
        report.shapes.append({name: list(value.shape) for name, value in feed.items()})
        try:
            expected = ref_session.run(ref_names, feed)
        except Exception as exc:  # onnxruntime raises its own exception hierarchy
            raise ModelError(f"the original model fails on its check input: {str(exc).splitlines()[0]}") from None
        try:
            got = cand_session.run(cand_names, {k: v for k, v in feed.items() if k in cand_inputs})
        except Exception as exc:  # e.g. a rewrite that hard-codes batch 1 fails at the second batch size
            shapes = {name: list(value.shape) for name, value in feed.items()}
            raise EquivalenceError(f"the compiled model fails on an input the original accepts ({shapes}): "
                                   f"{str(exc).strip().splitlines()[0]}") from None
        for error, a, b in zip(report.outputs, expected, got):
            _compare(error, np.asarray(a), np.asarray(b), rtol, atol)
    return report
