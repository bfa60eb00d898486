"""Atomic writes of reports (JSON, Markdown, text): the one place cnnc writes a report file.

A report is written to a temporary file beside its target (named by `cnnc.io.temporaries`), fsync'ed and moved in
with `os.replace`, so a reader (or a CI step after a killed run) sees the previous file or the new one, never half
of one. Errors are plain `OSError`s:
the command line turns them into usage errors naming its option (`cnnc.cli.outputs`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from cnnc.io import temporaries


def write_text(path: str | Path, text: str, make_parents: bool = False) -> Path:
    """Write `text` to `path` atomically (temporary file in the same folder, fsync, `os.replace`)."""
    target = Path(path)
    if make_parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    temporaries.remove_stale(target.parent)
    temporary = target.with_name(temporaries.temporary_name())  # short: a 255-byte target name stays writable
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def _compact_number_lists(text: str) -> str:
    # json.dumps(indent=...) puts every number of a list on its own line; keep lists of plain numbers on one line.
    return re.sub(r"\[\s*(-?[0-9][0-9.eE+-]*(?:,\s*-?[0-9][0-9.eE+-]*)*)\s*\]",
                  lambda m: "[" + ", ".join(part.strip() for part in m.group(1).split(",")) + "]", text)


def write_json(path: str | Path, payload, indent: int = 2, compact_numbers: bool = False,
               make_parents: bool = False) -> Path:
    """`payload` as JSON (values JSON cannot hold written with `str`), atomically; `compact_numbers` keeps lists of
    numbers (e.g. latency samples) on one line."""
    text = json.dumps(payload, indent=indent, default=str)
    return write_text(path, (_compact_number_lists(text) if compact_numbers else text) + "\n", make_parents)


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())
