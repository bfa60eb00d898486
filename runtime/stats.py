"""Statistics of latency measurements: summaries of per-call times, and ratios with paired bootstrap intervals.

Per-call latencies give min, median (p50), p90, p99 (numpy's linear interpolation), mean, sample standard deviation
and throughput = batch / mean latency. A ratio compares two models timed in the same interleaved rounds, and its
bootstrap resamples whole rounds, so that the pairing (both calls saw the same machine state) is kept.

Sessions. Two onnxruntime sessions of one identical model differ by about 1 % (2-core EPYC, ResNet-18 at 64 px,
batch 1: four sessions measured 0.989-1.014 of the first in one run), an offset that stays for the session's life:
where its memory landed, its thread pool. Rounds timed on one session per model cannot see it, so their interval is
too narrow for a claim about the *model*. When the rounds rotate over several sessions per model (`groups`: the
session pair of each round), the bootstrap is two-stage: it resamples the session pairs, then rounds within each,
so the interval holds the session-to-session variance too, and the median pools every session.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 1000


def summarize(samples_s: Sequence[float], batch: int) -> dict:
    """Statistics of per-call latencies given in seconds; times in milliseconds, throughput in items per second."""
    values = np.asarray(samples_s, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no samples to summarize")
    mean = float(values.mean())
    p50, p90, p99 = (float(v) for v in np.percentile(values, [50, 90, 99]))
    return {
        "n": int(values.size),
        "min_ms": float(values.min()) * 1e3,
        "p50_ms": p50 * 1e3,
        "p90_ms": p90 * 1e3,
        "p99_ms": p99 * 1e3,
        "mean_ms": mean * 1e3,
        "std_ms": float(values.std(ddof=1)) * 1e3 if values.size > 1 else 0.0,
        "max_ms": float(values.max()) * 1e3,
        "throughput_per_s": batch / mean if mean > 0 else float("inf"),
    }


def ratio_to_first(first_s: Sequence[float], other_s: Sequence[float], seed: int = 0,
                   resamples: int = BOOTSTRAP_RESAMPLES, groups: Sequence[int] | None = None) -> dict:
    """How `other` compares with `first`, both timed in the same rounds (sample i of each comes from round i).

    `ratio` = median(other) / median(first) (< 1: other is faster), `speedup` = its inverse, `paired_median` = the
    median over rounds of other_i / first_i, and `ci95` a 95 % percentile-bootstrap interval of `ratio` that resamples
    whole rounds (seeded: the same samples always give the same interval). `groups` (one id per round: the sessions
    the round ran on) makes the bootstrap two-stage, groups then rounds within each (module docstring).
    """
    first = np.asarray(first_s, dtype=np.float64)
    other = np.asarray(other_s, dtype=np.float64)
    if first.shape != other.shape or first.size == 0:
        raise ValueError("ratio_to_first needs two non-empty sample lists of one length (one per round)")
    if np.any(first <= 0) or np.any(other <= 0):
        raise ValueError("latencies must be positive (a clock that did not move?)")
    ratio = float(np.median(other) / np.median(first))
    rng = np.random.default_rng(seed)
    if groups is None:
        picks = rng.integers(0, first.size, size=(resamples, first.size))
        boot = np.median(other[picks], axis=1) / np.median(first[picks], axis=1)
    else:
        boot = _two_stage(first, other, np.asarray(groups), rng, resamples)
    low, high = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    return {"ratio": ratio, "speedup": 1.0 / ratio, "paired_median": float(np.median(other / first)),
            "ci95": [low, high]}


def _two_stage(first: np.ndarray, other: np.ndarray, groups: np.ndarray, rng: np.random.Generator,
               resamples: int) -> np.ndarray:
    """Bootstrap ratios of medians that resample the groups with replacement, then the rounds within each chosen
    group with replacement (a cluster bootstrap: the groups' own offsets become part of the spread)."""
    if groups.shape != first.shape:
        raise ValueError("groups needs one id per round")
    members = [np.flatnonzero(groups == group) for group in np.unique(groups)]
    boot = np.empty(resamples)
    for index in range(resamples):
        chosen = rng.integers(0, len(members), size=len(members))
        rounds = np.concatenate([members[c][rng.integers(0, members[c].size, size=members[c].size)]
                                 for c in chosen])
        boot[index] = np.median(other[rounds]) / np.median(first[rounds])
    return boot
