"""t as a function of training progress (seed 000 §5.3), and the callback that drives a `SkipHomotopy` with it.

The paper anneals t from t0 to 0 with a value per epoch (`ListSchedule` of `PAPER_SCHEDULE_FROM_0_9` or
`PAPER_SCHEDULE_FROM_0_5`); cnnc adds linear and cosine annealing and the paper's step-down on validation accuracy.
Every schedule reaches its final t at the start of the last epoch, so the last epoch trains the skip-free network.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from cnnc.homotopy.wrap import SkipHomotopy

# The paper's per-epoch lists (seed 000 §5.3). The text prints the second as {..., 0.01, 0.05, 0}: 0.05 after 0.01
# breaks the monotone decrease of every other list in the paper and is read as a typo for 0.005.
PAPER_SCHEDULE_FROM_0_9 = (0.9, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.025, 0.01, 0.0)
PAPER_SCHEDULE_FROM_0_5 = (0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.025, 0.01, 0.005, 0.0)


class HomotopySchedule(ABC):
    """t as a function of training progress: `at(epoch, fraction)` with fraction ∈ [0, 1) inside the epoch."""

    @abstractmethod
    def at(self, epoch: int, fraction: float = 0.0) -> float:
        """t at `epoch` (0-based), `fraction` of the way through it."""

    def observe(self, epoch: int, accuracy: float) -> None:
        """Validation accuracy at the end of `epoch`; only accuracy-driven schedules use it."""


@dataclass
class ListSchedule(HomotopySchedule):
    """A value per epoch (the paper's method); epochs past the end keep the last value."""

    values: Sequence[float]

    def __post_init__(self):
        if not self.values:
            raise ValueError("a list schedule needs at least one value")

    def at(self, epoch: int, fraction: float = 0.0) -> float:
        return float(self.values[min(max(epoch, 0), len(self.values) - 1)])


def _progress(epoch: int, fraction: float, epochs: int) -> float:
    """0 at the start of training, 1 at the start of the last epoch (so the last epoch trains at t_end)."""
    if epochs <= 1:
        return 1.0
    return min(1.0, max(0.0, (epoch + fraction) / (epochs - 1)))


@dataclass
class _AnnealSchedule(HomotopySchedule):
    """t0 → t_end, reaching t_end exactly at the start of the last of `epochs` epochs; `between` is the curve."""

    t0: float
    epochs: int
    t_end: float = 0.0

    def at(self, epoch: int, fraction: float = 0.0) -> float:
        p = _progress(epoch, fraction, self.epochs)
        return self.t_end if p >= 1.0 else self.between(p)

    @abstractmethod
    def between(self, p: float) -> float:
        """t at progress p ∈ [0, 1)."""


@dataclass
class LinearSchedule(_AnnealSchedule):
    """t0 → t_end linearly, reaching t_end exactly at the start of the last of `epochs` epochs."""

    def between(self, p: float) -> float:
        return self.t0 + (self.t_end - self.t0) * p


@dataclass
class CosineSchedule(_AnnealSchedule):
    """t0 → t_end along half a cosine, reaching t_end exactly at the start of the last epoch."""

    def between(self, p: float) -> float:
        return self.t_end + (self.t0 - self.t_end) * 0.5 * (1 + math.cos(math.pi * p))


@dataclass
class AccuracyStepSchedule(HomotopySchedule):
    """The paper's alternative: t steps down to `values[k+1]` once validation accuracy reaches `thresholds[k]`.

    At most one step per observed epoch (the network adapts to each t before the next). `zero_from_epoch` forces
    t = 0 from that epoch on, so that a fixed training budget always ends without skips.
    """

    values: Sequence[float]
    thresholds: Sequence[float]
    zero_from_epoch: int | None = None
    level: int = 0

    def __post_init__(self):
        if len(self.thresholds) != len(self.values) - 1:
            raise ValueError("need one threshold per step: len(thresholds) == len(values) - 1")

    def at(self, epoch: int, fraction: float = 0.0) -> float:
        if self.zero_from_epoch is not None and epoch >= self.zero_from_epoch:
            return 0.0
        return float(self.values[self.level])

    def observe(self, epoch: int, accuracy: float) -> None:
        if self.level < len(self.thresholds) and accuracy >= self.thresholds[self.level]:
            self.level += 1


@dataclass
class HomotopyCallback:
    """Drives a `SkipHomotopy` from any training loop; `history` records every t that was set."""

    homotopy: SkipHomotopy
    schedule: HomotopySchedule
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (epoch, fraction, t)

    def on_epoch_start(self, epoch: int) -> float:
        return self._set(epoch, 0.0)

    def on_step(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        return self._set(epoch, step / max(steps_per_epoch, 1))

    def on_validation_end(self, epoch: int, accuracy: float) -> None:
        self.schedule.observe(epoch, accuracy)

    @property
    def t(self) -> float | dict[str, float]:
        return self.homotopy.t

    def _set(self, epoch: int, fraction: float) -> float:
        value = self.schedule.at(epoch, fraction)
        self.homotopy.set_t(value)
        self.history.append((epoch, fraction, value))
        return value
