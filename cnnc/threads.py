"""Thread counts for torch and onnxruntime during a compile: one thread per physical core, spinning off.

Why. A compile runs torch (collapse's float64 probing, the evaluator) and several onnxruntime sessions (constant
folding, the equivalence check) in one process. Left alone, torch sizes its pool from the logical CPUs and
onnxruntime's threads spin-wait between ops; when other processes compete for the cores (a CI runner, a shared
workstation), spinning threads burn the time slices the working threads need, and hyper-threads share one core's
units. In the issue that measured this, a compile took 64-207 s under contention against 2-16 s on a quiet machine:
oversubscription. So cnnc uses one thread per *physical* core the process may run on (its affinity mask, not the
machine's count) and turns spinning off for the sessions it creates to check a result (`cnnc.runtime.session`);
latency benchmarks keep spinning on, as onnxruntime does by default, and say so.

`CNNC_THREADS=n` overrides the count (e.g. 1 on a busy CI runner). A library must not change its caller's global
state for good: `compile_threads()` sets torch's intra-op threads for the duration of a compile and restores the
caller's setting afterwards; onnxruntime's counts are per session, read from `session_threads()`.

Physical cores are read from Linux's sysfs topology (`/sys/devices/system/cpu/cpuN/topology`), without psutil: a
(package, core) pair per allowed CPU; elsewhere the logical count of `os.sched_getaffinity` / `os.cpu_count`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Iterator
from pathlib import Path

import torch

from cnnc.errors import UsageError

ENV = "CNNC_THREADS"
_SYSFS = Path("/sys/devices/system/cpu")
_active: list[int] = []  # the counts of the compile_threads() contexts entered, innermost last


def allowed_cpus() -> list[int]:
    """The logical CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


@functools.lru_cache(maxsize=1)
def physical_cores() -> int:
    """Physical cores among the allowed CPUs (hyper-threads of one core count once); at least 1."""
    cpus = allowed_cpus()
    cores = set()
    for cpu in cpus:
        topology = _SYSFS / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:  # no sysfs (not Linux, or a sandbox hides it): count logical CPUs
            return max(1, len(cpus))
    return max(1, len(cores))


def thread_count() -> int:
    """`CNNC_THREADS` when set (a positive integer), else the physical core count."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return physical_cores()
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise UsageError(f"{ENV}={value!r}: give a positive number of threads")
    return count


def session_threads() -> int:
    """The intra-op thread count for an onnxruntime session cnnc creates: the compile's, else `thread_count()`."""
    return _active[-1] if _active else thread_count()


@contextlib.contextmanager
def compile_threads(count: int | None = None) -> Iterator[int]:
    """Set torch's intra-op threads to `count` (default `thread_count()`) inside the block, restore them after."""
    count = count if count is not None else thread_count()
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    _active.append(count)
    try:
        yield count
    finally:
        _active.pop()
        torch.set_num_threads(previous)


def with_compile_threads(function):
    """Decorator: run `function` inside `compile_threads()` (what `cnnc.compile` does)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with compile_threads():
            return function(*args, **kwargs)

    return wrapper


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo, else the platform's): what the roofline cache and the bench
    environment are keyed by, beside the core counts above."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
