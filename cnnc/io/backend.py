"""Backend: graphsurgeon graph -> checked ModelProto -> file, written atomically.

- The emitted IR version and opset are ones the installed onnxruntime accepts (`cnnc.io.target`).
- Every emitted model passes onnx's checker at the level its input is held to (`validate.check_with_onnx`).
- Writing never leaves a partial file at the destination: model (and data) go to a temporary folder beside the
  target (`cnnc.io.temporaries`: a short name with the writer's pid; those of killed writers are removed), are
  fsync'ed, and are moved in with `os.replace`. An external-data file always gets a name that no existing file has,
  so the previous model at the destination keeps pointing at its own, intact data until the instant the new model
  replaces it; the stale data file is removed afterwards.
- Models over 2 GB (protobuf's limit) are written with external data `<out>.data` automatically.
- Weights are never copied wholesale: checking and shape inference see a weightless copy (`cnnc.ir.weightless`), and
  external data is written tensor by tensor from the model itself, so a save holds at most one extra tensor.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from cnnc import ir
from cnnc.errors import ModelError
from cnnc.io import target, temporaries
from cnnc.io.validate import check_with_onnx
from cnnc.ir.weightless import copy_fields, serialized_size, tensor_nbytes, weightless_copy, without_data

PROTOBUF_LIMIT_BYTES = 2**31 - 1
# Leave headroom under the protobuf limit for the graph structure itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 2**31 - 2**26

# A seam for the kill-during-save test (tests/test_backend.py): called after the staged files are complete and
# fsync'ed, before anything is moved into place. Never set in production; no environment variable can reach it.
_before_replace = None


def _export(graph: gs.Graph, release: bool = False) -> onnx.ModelProto:
    """graphsurgeon's export, except that each large constant is written into the model field by field: its
    export would go through protobuf's MergeFrom, which serializes the tensor (one more copy of it, and an error
    for a tensor over 2 GB). An untouched imported weight is copied from its TensorProto, never through numpy.
    `release`: each large array a pass made is dropped once written; the graph's constant reads the model's
    TensorProto instead (the same values), so the weights are held once, in the model."""
    model, large = ir.export_weightless(graph, do_type_check=True)
    constants = graph.tensors() if release and large else {}  # (a pass over the whole graph: only when needed)
    names = {tensor.name for tensor in large}
    kept = [value for value in model.graph.input if value.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    for tensor in large:
        values = tensor._values
        proto = model.graph.initializer.add()
        if isinstance(values, np.ndarray):
            proto.name, proto.data_type = tensor.name, onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
            proto.dims.extend(values.shape)
            proto.raw_data = np.ascontiguousarray(values).tobytes()
            if release:  # the copy in `large` and the graph's constant share the array: both let go of it
                tensor._values = constants[tensor.name]._values = LazyValues(proto)
            del values
        else:  # graphsurgeon's LazyValues: the imported TensorProto itself. CopyFrom copies message to message
            # (measured: no transient); reading `raw_data` into Python would make one more copy of the tensor.
            proto.CopyFrom(values.tensor)
            proto.name = tensor.name
    return model


def to_model(graph: gs.Graph, template: onnx.ModelProto | None = None, release: bool = False) -> onnx.ModelProto:
    """Export `graph` with an IR version and opset onnxruntime accepts, keeping the template's metadata.

    `release` (for a graph the caller is done with, or will only read): large weights that passes made move into
    the model instead of being copied, and the graph's constants read them from there; the model must then not be
    modified in place while the graph is in use."""
    model = _export(graph, release)
    if template is not None:
        model.producer_name = template.producer_name or model.producer_name
        model.model_version = template.model_version
        model.doc_string = template.doc_string
        del model.metadata_props[:]
        model.metadata_props.extend(template.metadata_props)
        # graphsurgeon keeps only the opsets its graph records; carry custom domains over from the original.
        domains = {o.domain for o in model.opset_import}
        for opset in template.opset_import:
            if opset.domain not in domains:
                model.opset_import.append(opset)
        _carry_input_defaults(model, template)
    # Always the newest IR onnxruntime accepts, never the input's: graphsurgeon keeps the imported IR version but
    # writes IR >= 4 structure (initializers not listed as graph inputs), which an IR 3 model may not have.
    model.ir_version = target.max_ir_version()
    # graphsurgeon exports a value_info for every typed tensor, shape or not; the full checker rejects shapeless
    # ones and they tell onnxruntime nothing that inference does not.
    shaped = [v for v in model.graph.value_info if v.type.tensor_type.HasField("shape")]
    if len(shaped) < len(model.graph.value_info):  # (rebuilt only then: the extend copies every entry)
        del model.graph.value_info[:]
        model.graph.value_info.extend(shaped)
    _fill_output_shapes(model)
    return model


def _carry_input_defaults(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """The template's inputs with a default (an initializer of the same name, IR >= 4) are imported as plain inputs
    (`ir.import_model`) so that no pass bakes the default in: give them their default back, as it was."""
    shadowed = set(ir.shadowed_input_names(template.graph, template.ir_version))
    present = {value.name for value in model.graph.input} - {tensor.name for tensor in model.graph.initializer}
    for tensor in template.graph.initializer:
        if tensor.name in shadowed and tensor.name in present:
            model.graph.initializer.append(tensor)  # a copy: the template stays read-only


def _fill_output_shapes(model: onnx.ModelProto) -> None:
    """Give graph outputs that lack a shape the one ONNX shape inference finds (the full checker requires it)."""
    missing = [o for o in model.graph.output if not o.type.tensor_type.HasField("shape")]
    if not missing:
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(weightless_copy(model), strict_mode=False)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
        return
    found = {o.name: o for o in inferred.graph.output}
    for output in missing:
        if output.name in found and found[output.name].type.tensor_type.HasField("shape"):
            output.type.CopyFrom(found[output.name].type)


def check(model: onnx.ModelProto) -> str:
    """The ONNX checker on an emitted model, by the rule its input was checked with (`validate.check_with_onnx`:
    full, or plain where strict inference fails inside onnx's own function expansion); `model` untouched."""
    return check_with_onnx(model, "emitted model")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fresh_data_name(folder: Path, base: str) -> str:
    name = f"{base}.data"
    index = 1
    while (folder / name).exists() or (folder / name).is_symlink():
        name = f"{base}.{index}.data"
        index += 1
    return name


def _external_locations(model: onnx.ModelProto) -> set[str]:
    locations = set()
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    return locations


def _stale_data_of(path: Path) -> set[Path]:
    """Data files the model currently at `path` owns (same folder, our naming), to delete once it is replaced."""
    if not path.is_file() or path.is_symlink():
        return set()
    try:
        old = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a readable model: it owns nothing we may delete
        return set()
    stale = set()
    for location in _external_locations(old):
        candidate = path.parent / location
        if location.startswith(path.name) and "/" not in location and candidate.is_file():
            stale.add(candidate)
    return stale


# Large tensors start at a multiple of this in the data file (as onnx writes them), so that readers can map them.
DATA_ALIGNMENT = 4096
ALIGN_FROM_BYTES = 1 << 20


_INTEGER_TYPES = frozenset({onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16,
                            onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.UINT16,
                            onnx.TensorProto.UINT32, onnx.TensorProto.UINT64})


def _write_with_external_data(model: onnx.ModelProto, model_path: Path, data_path: Path, min_bytes: int) -> bool:
    """Write the initializers of at least `min_bytes` (and not empty) to `data_path` one by one, then the model
    pointing at them to `model_path`. The model itself is not modified and never copied with its weights.
    Returns whether any tensor went to the data file (if none, no data file is left)."""
    light = onnx.ModelProto()
    copy_fields(model, light, skip=("graph",))
    copy_fields(model.graph, light.graph, skip=("initializer",))
    location = data_path.name
    offset = 0
    with open(data_path, "wb") as data:
        for tensor in model.graph.initializer:
            size = tensor_nbytes(tensor)
            # A small integer tensor stays inline whatever min_bytes says: onnxruntime reads shape-like inputs
            # (Reshape's shape, axes, pads, split sizes) only from raw data, so a model with them external fails to
            # load.
            shape_like = tensor.data_type in _INTEGER_TYPES and size < 1024
            if size < max(min_bytes, 1) or shape_like or tensor.data_location == onnx.TensorProto.EXTERNAL:
                light.graph.initializer.append(tensor)
                continue
            values = (tensor.raw_data if tensor.HasField("raw_data")
                      else onnx.numpy_helper.to_array(tensor).tobytes())
            if size >= ALIGN_FROM_BYTES and offset % DATA_ALIGNMENT:
                padding = DATA_ALIGNMENT - offset % DATA_ALIGNMENT
                data.write(b"\0" * padding)
                offset += padding
            data.write(values)
            external = without_data(tensor)
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(values)))):
                entry = external.external_data.add()
                entry.key, entry.value = key, value
            external.data_location = onnx.TensorProto.EXTERNAL
            light.graph.initializer.append(external)
            offset += len(values)
            del values
    if light.ByteSize() > PROTOBUF_LIMIT_BYTES:
        raise ModelError("the model is over 2 GB without its initializers (tensors inside node attributes); "
                         "it cannot be written")
    onnx.save_model(light, model_path)
    if offset == 0:
        data_path.unlink()
        return False
    return True


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields_by_number(message, low: int, high: int):
    """A copy of `message` with only its fields numbered in [low, high) (no value of another field is read)."""
    part = type(message)()
    copy_fields(message, part, skip=tuple(f.name for f in message.DESCRIPTOR.fields if not low <= f.number < high))
    return part


def _write_inline(model: onnx.ModelProto, path: Path) -> None:
    """`onnx.save_model(model, path)` byte for byte, without `SerializeToString()` of the whole model (a full copy of
    the weights in Python, and one more inside protobuf): protobuf writes a message's fields in field-number order,
    so the file is the model's fields before `graph` (7), the graph's tag and length, the graph's fields before
    `initializer` (5), each initializer serialized on its own, the graph's fields after it, and the model's after
    `graph`. Each initializer is serialized twice (its size first, for the graph's length), one at a time."""
    graph = model.graph
    initializer_tag, graph_tag = b"\x2a", b"\x3a"  # (5 << 3) | 2 and (7 << 3) | 2: length-delimited fields
    before, after = _fields_by_number(graph, 0, 5), _fields_by_number(graph, 6, 1 << 29)
    sizes = [len(tensor.SerializeToString()) for tensor in graph.initializer]
    graph_size = before.ByteSize() + after.ByteSize() + sum(1 + len(_varint(n)) + n for n in sizes)
    with open(path, "wb") as out:
        out.write(_fields_by_number(model, 0, 7).SerializeToString())
        out.write(graph_tag + _varint(graph_size) + before.SerializeToString())
        for tensor, size in zip(graph.initializer, sizes):
            out.write(initializer_tag + _varint(size))
            out.write(tensor.SerializeToString())
        out.write(after.SerializeToString())
        out.write(_fields_by_number(model, 8, 1 << 29).SerializeToString())


def save(model: onnx.ModelProto, path: str | Path, external_data: bool | None = None,
         notes: list[str] | None = None) -> list[Path]:
    """Write `model` to `path` atomically; returns the files written. `external_data=None` decides by size.

    Temporaries that a killed save left in the folder are removed first, with a line each in `notes`. An OSError
    (read-only folder, full disk, a name over NAME_MAX) is the user's `ModelError` "cannot write PATH: reason";
    the previous file at `path` is then intact and nothing is left behind."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        if not folder.is_dir():
            raise ModelError(f"output folder {folder} does not exist")
        if path.is_dir():
            raise ModelError(f"output path {path} is a folder")
        removed = temporaries.remove_stale(folder)
        if notes is not None:
            notes.extend(temporaries.stale_notes(removed))
        use_external = (external_data if external_data is not None
                        else serialized_size(model) > EXTERNAL_DATA_THRESHOLD_BYTES)
        stale = _stale_data_of(path)
        written = _save_staged(model, path, folder, use_external, external_data)
    except OSError as error:
        raise temporaries.cannot_write(path, error) from None
    for old_data in stale - set(written):
        try:
            old_data.unlink(missing_ok=True)
        except OSError:  # the new model is in place; an old data file left behind harms nothing
            pass
    return written


def _save_staged(model: onnx.ModelProto, path: Path, folder: Path, use_external: bool,
                 forced: bool | None) -> list[Path]:
    """Stage the files in a fresh temporary folder beside `path`, fsync them and move them in (data first, under a
    name nothing points at yet); on any failure, remove what was staged or moved."""
    staging = folder / temporaries.temporary_name()
    os.mkdir(staging)
    moved_data = None
    try:
        staged_model = staging / path.name
        written = [path]
        data_name = None
        if use_external:
            data_name = _fresh_data_name(folder, path.name)
            # Forced external data moves every initializer out; above 2 GB only those over 1 KB need to go.
            if _write_with_external_data(model, staged_model, staging / data_name, 0 if forced else 1024):
                _fsync_file(staging / data_name)
            else:  # no tensor qualified (a model without initializers): no data file
                data_name = None
        else:
            _write_inline(model, staged_model)
        _fsync_file(staged_model)
        if _before_replace is not None:
            _before_replace()
        if data_name is not None:
            os.replace(staging / data_name, folder / data_name)  # a fresh name: nothing points at it yet
            moved_data = folder / data_name
            written.append(moved_data)
        os.replace(staged_model, path)
        moved_data = None  # the new model points at it now
        _fsync_dir(folder)
    except BaseException:
        if moved_data is not None:
            moved_data.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written
