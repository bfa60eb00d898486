"""Typed precondition results for per-node rewrites (after onnxscript's `MatchResult` / `check_result.fail`).

A rewrite strategy returns `success(value)` or `fail("W is not a constant initializer")`: a falsy result that
carries the reason, so the pass can put it in its skip record instead of a bare False. `first_match` tries
strategies in order (fold BN into the producer, else into the consumer, else Mul+Add; one Conv, else one Gemm) and
returns the first success together with the failures before it, or every (strategy, reason) for the skip message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MatchResult:
    """A strategy's answer: truthy with `value` on success, falsy with `reason` otherwise."""

    ok: bool
    value: Any = None
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


def success(value: Any = None) -> MatchResult:
    return MatchResult(True, value)


def fail(reason: str) -> MatchResult:
    return MatchResult(False, reason=reason)


@dataclass
class FirstMatch:
    """The outcome of `first_match`: the strategy that succeeded (None if none did), its value, and the failures
    of the strategies tried before it (all of them when none succeeded)."""

    strategy: str | None = None
    value: Any = None
    failures: list[tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.strategy is not None

    def reasons(self, labelled: bool = False) -> str:
        """The failures as one line: 'why; why' or, `labelled`, 'strategy: why; strategy: why'."""
        return "; ".join(f"{name}: {why}" if labelled else why for name, why in self.failures)


def first_match(strategies: Iterable[tuple[str, Callable[[], MatchResult]]]) -> FirstMatch:
    """Try each (name, attempt) in order; stop at the first success. An attempt that fails must leave the graph
    as it found it, so the next one starts from the same graph."""
    outcome = FirstMatch()
    for name, attempt in strategies:
        result = attempt()
        if result:
            outcome.strategy, outcome.value = name, result.value
            return outcome
        outcome.failures.append((name, result.reason))
    return outcome
