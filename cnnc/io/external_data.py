"""Loading external tensor data from untrusted models without letting them read outside their folder.

onnx's own loader has had its path checks bypassed several times (a `..` prefix, then symlinks, then hardlinks), so
cnnc validates every external-data entry itself and reads the bytes itself:
- the location is relative, has no `..` component, and resolves (symlinks followed) inside the model's folder;
- the file is a regular file, not a symlink and not a hardlink (link count 1);
- offset and length are non-negative integers inside the file, and length equals shape x dtype size;
- only the keys the ONNX spec defines are accepted.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import onnx
from onnx import external_data_helper

from cnnc.errors import ModelError

KNOWN_KEYS = {"location", "offset", "length", "checksum"}


def _all_tensors(message):
    """Every TensorProto anywhere in `message`: initializers, sparse initializers' values and indices, Constant
    attributes (dense and sparse), subgraphs and functions. Walked by protobuf reflection, so no field is missed
    (onnx's own helper skips sparse tensors)."""
    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        for item in (value if field.is_repeated else (value,)):
            if isinstance(item, onnx.TensorProto):
                yield item
            else:
                yield from _all_tensors(item)


def _tensors_with_external_data(model: onnx.ModelProto):
    for tensor in _all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            yield tensor


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(True for _ in _tensors_with_external_data(model))


def external_data_files(model: onnx.ModelProto, model_dir: Path) -> set[Path]:
    """The checked paths (`resolve_location`) of the external-data files `model`, not yet loaded, references."""
    return {resolve_location(model_dir, tensor.name, next((e.value for e in tensor.external_data
                                                           if e.key == "location"), ""))
            for tensor in _tensors_with_external_data(model)}


def _parse_int(tensor_name: str, key: str, text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise ModelError(f"external data of tensor '{tensor_name}': {key} {text!r} is not an integer") from None
    if value < 0:
        raise ModelError(f"external data of tensor '{tensor_name}': {key} {value} is negative")
    return value


def _expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    count = 1
    for dim in tensor.dims:
        if dim < 0:
            raise ModelError(f"tensor '{tensor.name}' has a negative dimension {dim}")
        count *= dim
    return count * itemsize


def resolve_location(model_dir: Path, tensor_name: str, location: str) -> Path:
    """The checked path of an external-data file, or ModelError if it could leave the model's folder."""
    if not location:
        raise ModelError(f"external data of tensor '{tensor_name}' has an empty location")
    if "\x00" in location:
        raise ModelError(f"external data of tensor '{tensor_name}' has a NUL byte in its location")
    for flavour in (PurePosixPath(location), PureWindowsPath(location)):
        if flavour.is_absolute() or flavour.drive or flavour.root:
            raise ModelError(f"external data of tensor '{tensor_name}' has an absolute location {location!r}")
        if ".." in flavour.parts:
            raise ModelError(f"external data of tensor '{tensor_name}' location {location!r} contains '..'")
    base = model_dir.resolve()
    candidate = model_dir / location
    # Every component between the folder and the file must be a real directory, not a symlink to elsewhere. The
    # walk splits the location as the file system will when it is opened (on POSIX a backslash is part of a name).
    walk = model_dir
    for part in Path(location).parts:
        walk = walk / part
        if walk.is_symlink():
            raise ModelError(f"external data of tensor '{tensor_name}': {location!r} goes through a symlink")
    resolved = candidate.resolve()
    if not resolved.is_relative_to(base):
        raise ModelError(f"external data of tensor '{tensor_name}': {location!r} resolves outside the model folder")
    try:
        info = os.lstat(resolved)
    except FileNotFoundError:
        raise ModelError(f"external data file {location!r} of tensor '{tensor_name}' does not exist") from None
    if not stat.S_ISREG(info.st_mode):
        raise ModelError(f"external data {location!r} of tensor '{tensor_name}' is not a regular file")
    if info.st_nlink != 1:
        raise ModelError(f"external data {location!r} of tensor '{tensor_name}' is a hardlink; refusing to read it")
    return resolved


def load_external_data(model: onnx.ModelProto, model_dir: Path) -> None:
    """Validate and inline, in place, every external-data tensor of `model` (see the module docstring)."""
    for tensor in list(_tensors_with_external_data(model)):
        entries = {entry.key: entry.value for entry in tensor.external_data}
        unknown = set(entries) - KNOWN_KEYS
        if unknown:
            raise ModelError(f"external data of tensor '{tensor.name}' has unknown keys {sorted(unknown)}")
        path = resolve_location(model_dir, tensor.name, entries.get("location", ""))
        checked = os.lstat(path)
        file_size = checked.st_size
        offset = _parse_int(tensor.name, "offset", entries["offset"]) if "offset" in entries else 0
        expected = _expected_nbytes(tensor)
        if "length" in entries:
            length = _parse_int(tensor.name, "length", entries["length"])
        elif expected is not None:
            length = expected
        else:
            length = file_size - offset
        if offset > file_size or length > file_size - offset:
            raise ModelError(
                f"external data of tensor '{tensor.name}': offset {offset} + length {length} is past the end "
                f"of {entries['location']!r} ({file_size} bytes)")
        if expected is not None and length != expected:
            raise ModelError(
                f"external data of tensor '{tensor.name}': length {length} does not match its shape "
                f"{list(tensor.dims)} and dtype ({expected} bytes)")
        # Open without following a symlink and make sure it is the very file that was checked: a swap between the
        # check and the open (of the file or of a parent folder) is refused.
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError as error:
            raise ModelError(f"external data {entries['location']!r} cannot be opened safely: {error}") from None
        with os.fdopen(fd, "rb") as handle:
            opened = os.fstat(handle.fileno())
            if not stat.S_ISREG(opened.st_mode) or opened.st_nlink != 1 or \
                    (opened.st_dev, opened.st_ino) != (checked.st_dev, checked.st_ino):
                raise ModelError(f"external data {entries['location']!r} changed while it was being checked")
            handle.seek(offset)
            tensor.raw_data = handle.read(length)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
