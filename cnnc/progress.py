"""Progress bars for long work (dense Jacobians, fuzzing, benchmarks), drawn by click on stderr.

Bars are shown only when stderr is a terminal, or when CNNC_PROGRESS=1; CI logs and tests stay clean.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import click


def _enabled() -> bool:
    forced = os.environ.get("CNNC_PROGRESS")
    if forced is not None:
        return forced not in ("0", "", "false")
    return sys.stderr.isatty()


class _Silent:
    def update(self, n: int) -> None:
        pass


class _Lines:
    """For logs (CNNC_PROGRESS=1 without a terminal): one line per tenth of the work, with the elapsed time."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done, self.next_tenth = total, label, 0, 1
        self.clock, self.start = time.perf_counter, time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        while self.next_tenth <= 10 and self.done * 10 >= self.next_tenth * self.total:
            print(f"{self.label}: {self.done}/{self.total} ({self.clock() - self.start:.1f} s)", file=sys.stderr,
                  flush=True)
            self.next_tenth += 1


@contextlib.contextmanager
def progress(total: int, label: str):
    """A context manager yielding an object with `update(n)`; draws a bar when enabled."""
    if not _enabled() or total <= 1:
        yield _Silent()
        return
    if not sys.stderr.isatty():
        yield _Lines(total, label)
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, show_eta=True, show_percent=True) as bar:
        yield bar
