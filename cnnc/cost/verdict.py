"""Whether a rewrite pays: the estimated seconds before and after on a roofline, at each batch size asked for.

ratio(b) = seconds(before, b) / seconds(after, b)  (> 1: the rewrite is faster).
- "loses" when ratio(b) < 1 / (1 + margin) at some batch: slower beyond the model's margin of error;
- "pays" when ratio(b) > 1 + margin at every batch and the weights grow by at most 1 % (a model file should not grow
  for a guess), or when the rewrite is faster by a wide margin (ratio > `wide`) at every batch whatever its weights
  (a whole linear network collapsed into one small Gemm);
- "close" otherwise: only a measurement can tell (`--auto`, or the pass option `apply_close`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cnnc.cost.measure import Roofline
from cnnc.cost.model import Cost

WEIGHT_GROWTH = 0.01
WIDE = 2.0
REWRITE_BATCHES = (1, 8)  # a rewrite must pay at both, latency (batch 1) and throughput (batch 8): collapse and plan


@dataclass(frozen=True)
class Verdict:
    kind: str  # "pays" | "loses" | "close"
    ratio: float  # estimated seconds before / after at the worst batch (> 1: the rewrite is faster)
    reason: str  # one sentence with the figures

    def __bool__(self) -> bool:
        return self.kind == "pays"


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e4 else f"{n} B"


def compare(before: Cost, after: Cost, roof: Roofline, batches=(1,), margin: float = 0.10,
            wide: float = WIDE) -> Verdict:
    """The verdict on replacing `before` by `after` (module docstring)."""
    ratios = {b: roof.seconds(before, b) / max(roof.seconds(after, b), 1e-15) for b in batches}
    worst_batch = min(ratios, key=ratios.get)
    worst = ratios[worst_batch]
    growth = after.weight_bytes / before.weight_bytes - 1 if before.weight_bytes else (
        0.0 if not after.weight_bytes else float("inf"))
    figures = (f"est. {worst:.2f}x at batch {worst_batch} on {roof.provider} ({'measured' if roof.measured else 'built-in'}"
               f" roofline): MACs {before.macs} -> {after.macs}, weights {_megabytes(before.weight_bytes)} -> "
               f"{_megabytes(after.weight_bytes)}, activations {_megabytes(before.activation_bytes)} -> "
               f"{_megabytes(after.activation_bytes)}, kernels {before.kernels} -> {after.kernels}")
    if worst < 1 / (1 + margin):
        return Verdict("loses", worst, f"slower: {figures}")
    if worst > 1 + margin and (growth <= WEIGHT_GROWTH or worst > wide):
        return Verdict("pays", worst, f"faster: {figures}")
    if worst > 1 + margin:
        return Verdict("close", worst, f"faster but weights grow {100 * growth:.0f}%: {figures}")
    return Verdict("close", worst, f"within {100 * margin:.0f}%: {figures}")


def candidate_id(tensor_names) -> str:
    """A rewrite's stable id: the first 8 hex digits of sha1 over the sorted names of the tensors it rewrites."""
    return hashlib.sha1("\n".join(sorted(tensor_names)).encode()).hexdigest()[:8]


def chosen(verdict: Verdict, identifier: str, apply_close: str) -> bool:
    """Whether a pass applies a rewrite: it pays, or it is close and `apply_close` is "all" or names its id."""
    if verdict.kind == "pays":
        return True
    return verdict.kind == "close" and (apply_close == "all" or identifier in apply_close.split("+"))
