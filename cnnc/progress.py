"""Progress bars for long work (dense Jacobians, fuzzing, benchmarks), drawn by click on stderr.

Bars are shown only when stderr is a terminal, or when CNNC_PROGRESS=1; CI logs and tests stay clean.
"""

from __future__ import annotations

import contextlib
import os
import sys

import click


def _enabled() -> bool:
    forced = os.environ.get("CNNC_PROGRESS")
    if forced is not None:
        return forced not in ("0", "", "false")
    return sys.stderr.isatty()


class _Silent:
    def update(self, n: int) -> None:
        pass


@contextlib.contextmanager
def progress(total: int, label: str):
    """A context manager yielding an object with `update(n)`; draws a bar when enabled."""
    if not _enabled() or total <= 1:
        yield _Silent()
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, show_eta=True, show_percent=True) as bar:
        yield bar
