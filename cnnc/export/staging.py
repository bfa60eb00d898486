"""Atomic writes of exported artefacts that are more than one file: an OpenVINO IR (`.xml` + `.bin`), a Triton
model folder. The files are built and proven in a fresh temporary folder beside the target (`cnnc.io.temporaries`:
a killed writer's folder is removed by the next write), then moved in with `os.replace`; a folder that replaces an
existing one is swapped in (old moved aside, new moved in, old removed), so a reader sees the old unit or the new
one. Nothing reaches the target when the proof fails: the staging folder is removed whatever happens.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cnnc.errors import ModelError
from cnnc.io import temporaries


@contextmanager
def staging_folder(parent: Path, notes: list[str] | None = None) -> Iterator[Path]:
    """A fresh empty folder inside `parent` (which must exist), removed on exit."""
    if not parent.is_dir():
        raise ModelError(f"output folder {parent} does not exist")
    removed = temporaries.remove_stale(parent)
    if notes is not None:
        notes.extend(temporaries.stale_notes(removed))
    staging = parent / temporaries.temporary_name()
    try:
        os.mkdir(staging)
    except OSError as error:
        raise temporaries.cannot_write(parent, error) from None
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def move_in(staged: Path, target: Path) -> None:
    """Move `staged` (a file or a folder, inside a staging folder beside `target`) to `target`."""
    try:
        if staged.is_dir() and target.is_dir() and not target.is_symlink():
            aside = target.parent / temporaries.temporary_name()
            os.replace(target, aside)
            try:
                os.replace(staged, target)
            except OSError:
                os.replace(aside, target)  # put the old unit back
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            if target.is_dir():
                raise ModelError(f"output path {target} is a folder")
            os.replace(staged, target)
    except OSError as error:
        raise temporaries.cannot_write(target, error) from None
