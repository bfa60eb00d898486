"""The homotopy join and cnnc's explicit residual block (seed 000 §4).

A join computes join_t(F, S) = (1 − t)·F(x) + t·S(x), with F the residual branch, S the shortcut (the block input,
or a linear projection of it) and t a non-trainable buffer, possibly shared by every join of a model. t weighs the
shortcut: t = 0 is a plain feed-forward network, whose skips `remove-skip` deletes after export.
"""

from __future__ import annotations

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
