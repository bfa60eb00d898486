"""t as a function of training progress (seed 000 §5.3), and the callback that drives homotopies with it (a
`SkipHomotopy`, an `ActivationHomotopy`, or both on one model).

The paper anneals t from t0 to 0 with a value per epoch (`ListSchedule` of `PAPER_SCHEDULE_FROM_0_9` or
`PAPER_SCHEDULE_FROM_0_5`); cnnc adds linear and cosine annealing and the paper's step-down on validation accuracy.
Every schedule reaches its final t at the start of the last epoch, so the last epoch trains the skip-free network.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

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


class Homotopy(Protocol):
    """What a callback drives: `SkipHomotopy` and `ActivationHomotopy` both are one."""

    @property
    def t(self) -> float | dict[str, float]: ...

    def set_t(self, value: float) -> None: ...


@dataclass
class HomotopyCallback:
    """Drives one homotopy, or several on one model (skips and activations), from any training loop.

    `schedule` is one schedule for all of them, or one per homotopy (in the same order): e.g. the skips annealed in
    the first half of training and the activations in the second. `history` records every value set: (epoch,
    fraction, t) with t a float for one schedule, a tuple (one per homotopy) for several.
    """

    homotopy: Homotopy | Sequence[Homotopy]
    schedule: HomotopySchedule | Sequence[HomotopySchedule]
    history: list[tuple[int, float, float | tuple[float, ...]]] = field(default_factory=list)

    def __post_init__(self):
        self._homotopies = list(self.homotopy) if isinstance(self.homotopy, Sequence) else [self.homotopy]
        self._schedules = list(self.schedule) if isinstance(self.schedule, Sequence) else \
            [self.schedule] * len(self._homotopies)
        if len(self._schedules) != len(self._homotopies):
            raise ValueError(f"{len(self._schedules)} schedules for {len(self._homotopies)} homotopies: give one "
                             "schedule, or one per homotopy")

    def on_epoch_start(self, epoch: int) -> float | tuple[float, ...]:
        return self._set(epoch, 0.0)

    def on_step(self, epoch: int, step: int, steps_per_epoch: int) -> float | tuple[float, ...]:
        return self._set(epoch, step / max(steps_per_epoch, 1))

    def on_validation_end(self, epoch: int, accuracy: float) -> None:
        for schedule in {id(s): s for s in self._schedules}.values():  # a shared schedule steps once
            schedule.observe(epoch, accuracy)

    @property
    def t(self) -> float | dict[str, float] | list:
        values = [homotopy.t for homotopy in self._homotopies]
        return values[0] if len(values) == 1 else values

    def _set(self, epoch: int, fraction: float) -> float | tuple[float, ...]:
        values = tuple(schedule.at(epoch, fraction) for schedule in self._schedules)
        for homotopy, value in zip(self._homotopies, values):
            homotopy.set_t(value)
        value = values[0] if len(values) == 1 else values
        self.history.append((epoch, fraction, value))
        return value
