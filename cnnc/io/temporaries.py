"""Temporary names for atomic writes, the clean-up of those a killed writer left, and OS errors as user errors.

An atomic write stages its files under a temporary name beside the target and moves them in with `os.replace`.
The name is short and fixed in length, `.cnnc-<pid>-<8 hex>.tmp` (at most 27 bytes), so a target name of any legal
length (NAME_MAX, 255 bytes on Linux) can be staged: a name derived from the target's would exceed NAME_MAX for
long targets. The pid says which process owns it: a temporary whose process is gone was left by a writer killed
mid-save (kill -9, power loss), and the next write into the same folder removes it (`remove_stale`). Reusing pids
only makes the clean-up keep a stale temporary longer, never remove a live one. Processes in another pid namespace
writing into the same folder are not told apart; cnnc's writes are per-command, so this is accepted.

`cannot_write(path, error)` turns an `OSError` into the one user-facing `ModelError` "cannot write PATH: reason"
(exit 2): a read-only folder, a full disk or a name that is too long is not a bug in cnnc.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from pathlib import Path

from cnnc.errors import ModelError

_PATTERN = re.compile(r"^\.cnnc-(\d+)-[0-9a-f]{8}\.tmp$")


def temporary_name() -> str:
    """A fresh temporary name owned by this process."""
    return f".cnnc-{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # exists, owned by another user (or no such pid can exist)
        return True
    return True


def remove_stale(folder: Path) -> list[Path]:
    """Remove the temporaries in `folder` whose process is gone; returns what was removed. Never raises: a
    temporary that cannot be removed is left for the next write."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _PATTERN.match(name)
        if match is None or _alive(int(match.group(1))):
            continue
        path = folder / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


def stale_notes(removed: list[Path]) -> list[str]:
    return [f"removed {path}, a temporary left by an interrupted save" for path in removed]


def cannot_write(path: Path, error: OSError) -> ModelError:
    """The user's error for an OSError while writing `path`."""
    return ModelError(f"cannot write {path}: {error.strerror or error}")
