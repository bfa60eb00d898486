"""Backend: graphsurgeon graph -> checked ModelProto -> file, written atomically.

- The emitted IR version and opset are ones the installed onnxruntime accepts (`cnnc.target`).
- Every emitted model passes `onnx.checker.check_model(full_check=True)`.
- Writing never leaves a partial file at the destination: model (and data) go to a temporary folder beside the
  target, are fsync'ed, and are moved in with `os.replace`. An external-data file always gets a name that no
  existing file has, so the previous model at the destination keeps pointing at its own, intact data until the
  instant the new model replaces it; the stale data file is removed afterwards.
- Models over 2 GB (protobuf's limit) are written with external data `<out>.data` automatically.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from cnnc import target
from cnnc.errors import ModelError

PROTOBUF_LIMIT_BYTES = 2**31 - 1
# Leave headroom under the protobuf limit for the graph structure itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 2**31 - 2**26

# Test hook: when set, the writer pauses here after the temporary files exist and before they are moved in.
_PAUSE_ENV = "CNNC_TEST_PAUSE_BEFORE_REPLACE"


def to_model(graph: gs.Graph, template: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export `graph` with an IR version and opset onnxruntime accepts, keeping the template's metadata."""
    model = gs.export_onnx(graph, do_type_check=True)
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
    # Always the newest IR onnxruntime accepts, never the input's: graphsurgeon keeps the imported IR version but
    # writes IR >= 4 structure (initializers not listed as graph inputs), which an IR 3 model may not have.
    model.ir_version = target.max_ir_version()
    # graphsurgeon exports a value_info for every typed tensor, shape or not; the full checker rejects shapeless
    # ones and they tell onnxruntime nothing that inference does not.
    shaped = [v for v in model.graph.value_info if v.type.tensor_type.HasField("shape")]
    del model.graph.value_info[:]
    model.graph.value_info.extend(shaped)
    _fill_output_shapes(model)
    return model


def _fill_output_shapes(model: onnx.ModelProto) -> None:
    """Give graph outputs that lack a shape the one ONNX shape inference finds (the full checker requires it)."""
    missing = [o for o in model.graph.output if not o.type.tensor_type.HasField("shape")]
    if not missing or model.ByteSize() > EXTERNAL_DATA_THRESHOLD_BYTES:
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
        return
    found = {o.name: o for o in inferred.graph.output}
    for output in missing:
        if output.name in found and found[output.name].type.tensor_type.HasField("shape"):
            output.type.CopyFrom(found[output.name].type)


def check(model: onnx.ModelProto) -> None:
    """The full ONNX checker (with strict shape inference); models over 2 GB are checked through a file."""
    try:
        if model.ByteSize() > EXTERNAL_DATA_THRESHOLD_BYTES:
            with tempfile.TemporaryDirectory(prefix="cnnc-check-") as folder:
                path = Path(folder) / "model.onnx"
                onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
                onnx.checker.check_model(str(path), full_check=True)
        else:
            onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ModelError(f"emitted model fails the ONNX checker: {str(error).strip().splitlines()[0]}") from error


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
    from onnx import external_data_helper

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
    except Exception:  # not a readable model: it owns nothing we may delete
        return set()
    stale = set()
    for location in _external_locations(old):
        candidate = path.parent / location
        if location.startswith(path.name) and "/" not in location and candidate.is_file():
            stale.add(candidate)
    return stale


def save(model: onnx.ModelProto, path: str | Path, external_data: bool | None = None) -> list[Path]:
    """Write `model` to `path` atomically; returns the files written. `external_data=None` decides by size."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ModelError(f"output folder {folder} does not exist")
    if path.is_dir():
        raise ModelError(f"output path {path} is a folder")
    use_external = external_data if external_data is not None else model.ByteSize() > EXTERNAL_DATA_THRESHOLD_BYTES
    stale = _stale_data_of(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".cnnc-tmp", dir=folder))
    try:
        staged_model = staging / path.name
        written = [path]
        data_name = None
        if use_external:
            data_name = _fresh_data_name(folder, path.name)
            to_write = onnx.ModelProto()
            to_write.CopyFrom(model)
            # Forced external data moves every initializer out; above 2 GB only those over 1 KB need to go.
            onnx.save_model(to_write, staged_model, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=0 if external_data else 1024)
            if (staging / data_name).is_file():
                _fsync_file(staging / data_name)
            else:  # no tensor qualified (a model without initializers): onnx wrote no data file
                data_name = None
        else:
            onnx.save_model(model, staged_model)
        _fsync_file(staged_model)
        if os.environ.get(_PAUSE_ENV):
            Path(os.environ[_PAUSE_ENV]).write_text("paused")
            import time

            while True:  # the test kills the process here
                time.sleep(0.05)
        if data_name is not None:
            os.replace(staging / data_name, folder / data_name)  # a fresh name: nothing points at it yet
            written.append(folder / data_name)
        os.replace(staged_model, path)
        _fsync_dir(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old_data in stale - set(written):
        old_data.unlink(missing_ok=True)
    return written
