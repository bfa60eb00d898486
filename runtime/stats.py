"""Statistics of latency measurements: summaries of per-call times, and ratios with paired bootstrap intervals.

Per-call latencies give min, median (p50), p90, p99 (numpy's linear interpolation), mean, sample standard deviation
and throughput = batch / mean latency. A ratio compares two models timed in the same interleaved rounds, and its
bootstrap resamples whole rounds, so that the pairing (both calls saw the same machine state) is kept.

Sessions. Two onnxruntime sessions of one identical model differ by about 1 % (2-core EPYC, ResNet-18 at 64 px,
batch 1: four sessions measured 0.989-1.014 of the first in one run), an offset that stays for the session's life:
where its memory landed, its thread pool. Rounds timed on one session per model cannot see it, so their interval is
too narrow for a claim about the *model*. When the rounds rotate over k sessions per model (`groups`: the session
slot of each round), each slot gives one ratio of medians, and the interval is Student's t over the k slots' log
ratios: exp(mean +- t(0.975, k-1) * sd / sqrt(k)). The slots are the independent units; the rounds' noise is inside
each slot's ratio. A bootstrap over so few slots would not do: with k = 3 its percentile interval is about the
range of the three slots' ratios, which excludes the true ratio a quarter of the time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 1000
_T_GRID = 20001  # Simpson nodes for the t distribution's CDF (tests: tables and df = 2's closed form within 2e-4)


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


@functools.lru_cache(maxsize=256)  # ~35 ms a call, and --auto asks for the same few quantiles for every ratio
def t_quantile(probability: float, df: int) -> float:
    """Student's t quantile: the x with P(T <= x) = `probability`, T with `df` degrees of freedom (0.5 < p < 1).

    The CDF is 1/2 plus Simpson's rule over the density on [0, x], and x is found by bisection: numpy has no t
    distribution, and this is the only place that needs one (intervals at a family-wise level, e.g. 1 - 0.05 / m)."""
    if not 0.5 < probability < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < probability < 1 and df >= 1 (got {probability}, {df})")
    scale = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float) -> float:
        grid = np.linspace(0.0, x, _T_GRID)
        density = scale * (1.0 + grid * grid / df) ** (-(df + 1) / 2)
        weights = np.ones(_T_GRID)
        weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
        return 0.5 + float(weights @ density) * x / (3 * (_T_GRID - 1))

    low, high = 0.0, 1.0
    while cdf(high) < probability:
        low, high = high, 2 * high
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < probability else (low, middle)
    return (low + high) / 2


def ratio_to_first(first_s: Sequence[float], other_s: Sequence[float], seed: int = 0,
                   resamples: int = BOOTSTRAP_RESAMPLES, groups: Sequence[int] | None = None) -> dict:
    """How `other` compares with `first`, both timed in the same rounds (sample i of each comes from round i).

    `ratio` = median(other) / median(first) (< 1: other is faster), `speedup` = its inverse, `paired_median` = the
    median over rounds of other_i / first_i, and `ci95` a 95 % percentile-bootstrap interval of `ratio` that resamples
    whole rounds (seeded: the same samples always give the same interval). With `groups` (one id per round: the
    session slot it ran on; two slots at least), `ratio` is the geometric mean of the slots' ratios of medians and
    `ci95` Student's t interval over them (module docstring); `slots` lists each slot's ratio.
    """
    first = np.asarray(first_s, dtype=np.float64)
    other = np.asarray(other_s, dtype=np.float64)
    if first.shape != other.shape or first.size == 0:
        raise ValueError("ratio_to_first needs two non-empty sample lists of one length (one per round)")
    if np.any(first <= 0) or np.any(other <= 0):
        raise ValueError("latencies must be positive (a clock that did not move?)")
    paired = float(np.median(other / first))
    if groups is not None:
        slots = _slot_ratios(first, other, np.asarray(groups))
        if len(slots) > 1:
            interval = slot_interval(slots)
            return {"ratio": interval["ratio"], "speedup": interval["speedup"], "paired_median": paired,
                    "ci95": interval["ci"], "slots": interval["slots"]}
    ratio = float(np.median(other) / np.median(first))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, first.size, size=(resamples, first.size))
    boot = np.median(other[picks], axis=1) / np.median(first[picks], axis=1)
    low, high = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    return {"ratio": ratio, "speedup": 1.0 / ratio, "paired_median": paired, "ci95": [low, high]}


def slot_interval(slot_ratios: Sequence[float], level: float = 0.95) -> dict:
    """The geometric mean of session slots' ratios and its two-sided Student's t interval `ci` at `level`, from the
    slots alone (what a stored row of bench/zoo.py needs to be scored again, e.g. at a family-wise level; a
    one-sided bound at 1 - a is an end of the two-sided interval at 1 - 2a)."""
    logs = np.log(np.asarray(slot_ratios, dtype=np.float64))
    if logs.size < 2:
        raise ValueError("an interval over session slots needs two slots at least")
    half = t_quantile(0.5 + level / 2, logs.size - 1) * logs.std(ddof=1) / np.sqrt(logs.size)
    ratio = float(np.exp(logs.mean()))
    return {"ratio": ratio, "speedup": 1.0 / ratio, "level": level,
            "ci": [float(np.exp(logs.mean() - half)), float(np.exp(logs.mean() + half))],
            "slots": [float(v) for v in slot_ratios]}



def _slot_ratios(first: np.ndarray, other: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each group's ratio of medians, other / first, over the rounds of that group."""
    if groups.shape != first.shape:
        raise ValueError("groups needs one id per round")
    return np.array([np.median(other[groups == g]) / np.median(first[groups == g]) for g in np.unique(groups)])
