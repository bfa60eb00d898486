"""The homotopy join and cnnc's explicit residual block (seed 000 §4).

A join computes join_t(F, S) = (1 − t)·F(x) + t·S(x), with F the residual branch, S the shortcut (the block input,
or a linear projection of it) and t a non-trainable buffer, possibly shared by every join of a model. t weighs the
shortcut: t = 0 is a plain feed-forward network, whose skips `remove-skip` deletes after export.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class HomotopyJoin(nn.Module):
    """(1 − t)·branch + t·skip with t a buffer (`t` may be a tensor shared with other joins)."""

    def __init__(self, t: float | torch.Tensor = 0.5):
        super().__init__()
        self.register_buffer("t", t if isinstance(t, torch.Tensor) else torch.tensor(float(t)))

    def forward(self, branch: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return (1 - self.t) * branch + self.t * skip

    def extra_repr(self) -> str:
        return f"t={float(self.t):g}"


class Residual(nn.Module):
    """cnnc's residual block: `post(join(branch(x), shortcut(x)))`; a plain add until a homotopy wraps it."""

    def __init__(self, branch: nn.Module, shortcut: nn.Module | None = None, post: nn.Module | None = None):
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.post = post if post is not None else nn.Identity()
        self.join: HomotopyJoin | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch, skip = self.branch(x), self.shortcut(x)
        joined = branch + skip if self.join is None else self.join(branch, skip)
        return self.post(joined)


def common_t(values: dict[str, float]) -> float | dict[str, float]:
    """One float when every wrapped module has the same t, else t per module (a homotopy's `t` property)."""
    distinct = set(values.values())
    return distinct.pop() if len(distinct) == 1 else values


@torch.no_grad()
def assign_t(modules: Mapping[str, nn.Module], value: float | Mapping[str, float], shared: bool, what: str,
             unknown_label: str) -> None:
    """Set t on every module (a float) or on the named ones (a mapping; different values need shared=False).
    `what` ("join", "site") and `unknown_label` ("joins", "activation sites") name them in the errors."""
    values = dict(value) if isinstance(value, Mapping) else {name: value for name in modules}
    unknown = set(values) - set(modules)
    if unknown:
        raise KeyError(f"unknown {unknown_label}: {', '.join(sorted(unknown))}")
    if shared and len(set(values.values())) > 1:
        raise ValueError(f"this homotopy shares one t between its {what}s; wrap with shared=False for per-{what} t")
    for name, v in values.items():
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"t = {v} for {what} {name} is outside [0, 1]")
    for name, v in values.items():
        modules[name].t.fill_(float(v))
