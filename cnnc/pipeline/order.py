"""Ordering constraints between passes, as data (after torch.fx's `this_before_that_pass_constraint`).

`cnnc.passes.ORDER_CONSTRAINTS` lists pairs (before, after, why). A user's `--passes` order that violates one is
not refused (running collapse before fold-bn is legal and exact, just worse); the report carries a note per
violated pair saying why the order matters, and a test checks that `DEFAULT_PIPELINE` violates none.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class OrderConstraint:
    """Pass `before` should run before pass `after`, because `why`."""

    before: str
    after: str
    why: str

    def violated_by(self, names: Sequence[str]) -> bool:
        """Whether `after` runs before a run of `before` in `names` (passes may appear more than once)."""
        afters = [i for i, name in enumerate(names) if name == self.after]
        befores = [i for i, name in enumerate(names) if name == self.before]
        return bool(afters and befores) and min(afters) < max(befores)


def order_notes(names: Sequence[str], constraints: Iterable[OrderConstraint]) -> list[str]:
    """One line per constraint that the pass order `names` violates."""
    return [f"{c.after} runs before {c.before}: {c.why}" for c in constraints if c.violated_by(names)]
