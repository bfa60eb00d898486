"""A command's output files: written atomically, each failure one usage error naming its option, plots last.

matplotlib is optional (the `plot` extra). A command collects its files in an `Outputs`: `write` writes a report at
once; `plot` only records a drawing, and `finish` draws them after everything else is written. Without matplotlib,
`finish` draws nothing and raises ONE usage error (exit 2) that names the option and the files that were written, so
minutes of measurement are never thrown away for want of a plotting library.
"""

from __future__ import annotations

from collections.abc import Callable

import click

from cnnc.errors import UsageError
from cnnc.io import jsonio

PLOT_INSTALL = "pip install 'cnnc[plot]'"


def matplotlib_missing() -> bool:
    try:
        import matplotlib  # noqa: F401  (optional: the `plot` extra; only probed when a plot is asked for)
    except ImportError:
        return True
    return False


def _listing(paths: list[str]) -> str:
    return paths[0] if len(paths) == 1 else ", ".join(paths[:-1]) + " and " + paths[-1]


class Outputs:
    """The files one command writes; `announce` prints `wrote PATH` after each (as `cnnc bench` does)."""

    def __init__(self, announce: bool = False):
        self.announce = announce
        self.written: list[str] = []
        self._plots: list[tuple[str, str, Callable[[str], object]]] = []

    def write(self, option: str, path: str | None, writer: Callable[[str], object]) -> None:
        """Run `writer(path)` now; an OSError (a typo in the path) is the user's error, not an internal one."""
        if not path:
            return
        try:
            writer(path)
        except OSError as error:
            raise UsageError(f"cannot write {option} {path}: {error.strerror or error}") from None
        self.written.append(str(path))
        if self.announce:
            click.echo(f"wrote {path}")

    def json(self, option: str, path: str | None, payload, indent: int = 2) -> None:
        self.write(option, path, lambda p: jsonio.write_json(p, payload, indent=indent))

    def text(self, option: str, path: str | None, text: str) -> None:
        self.write(option, path, lambda p: jsonio.write_text(p, text))

    def plot(self, option: str, path: str | None, draw: Callable[[str], object]) -> None:
        """Record a drawing for `finish`."""
        if path:
            self._plots.append((option, path, draw))

    def finish(self) -> None:
        """Draw the recorded plots, or raise the one error that says matplotlib is missing and what was written."""
        if self._plots and matplotlib_missing():
            options = _listing(list(dict.fromkeys(option for option, _, _ in self._plots)))
            done = f" ({_listing(self.written)} {'was' if len(self.written) == 1 else 'were'} written)" \
                if self.written else ""
            raise UsageError(f"{options} needs matplotlib: {PLOT_INSTALL}{done}")
        for option, path, draw in self._plots:
            self.write(option, path, draw)


def write_json(option: str, path: str | None, payload: dict) -> None:
    """One JSON report at `path` (nothing when `path` is None), for commands with no other files."""
    Outputs().json(option, path, payload)

