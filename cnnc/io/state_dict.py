"""`.pt`/`.pth` state dicts into a torch module, safely.

A file is only ever read with `torch.load(weights_only=True)`, never retried otherwise; TorchScript archives (which
would execute code) and pickled modules are refused, and a state dict that does not fit the module is a ModelError.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from cnnc.errors import ModelError, UsageError


def _torch_load_reason(error: Exception) -> str:
    """The informative part of a torch.load error, on one line without terminal colour codes.

    torch's weights_only refusal opens with advice to retry with weights_only=False (which cnnc never does) and
    names the offending class only in its `WeightsUnpickler error:` line.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line.removeprefix("WeightsUnpickler error:").strip().split(". ")[0]
    return lines[0] if lines else type(error).__name__


def load_state_dict(path: str | Path) -> dict:
    """Load a `.pt`/`.pth` state dict with `weights_only=True`. Pickled modules and TorchScript are refused."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path} does not exist or is not a file")
    data = path.read_bytes()
    if not data:
        raise ModelError(f"{path} is empty")
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            if any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist()):
                raise ModelError(f"{path} is a TorchScript archive; cnnc does not execute TorchScript files")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError...: all mean "not a safe state dict"
        raise ModelError(f"{path} cannot be read with weights_only=True: {_torch_load_reason(error)}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ModelError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    return state


def apply_state_dict(module: Any, path: str | Path) -> None:
    """Load the state dict at `path` (weights_only) into the torch module `module`; mismatches are ModelErrors."""
    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"state_dict= needs a torch.nn.Module to load into, got {type(module).__name__}")
    state = load_state_dict(path)
    try:
        module.load_state_dict(state)
    except RuntimeError as error:  # missing or unexpected keys, shape mismatches: torch lists them over lines
        details = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise ModelError(f"{path} does not fit the module: {details}") from None
