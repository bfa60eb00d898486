"""`openvino` export: OpenVINO IR (`NAME.xml` + `NAME.bin`), proven on OpenVINO's CPU plugin.

`openvino.convert_model` reads the ONNX model (saved in the staging folder: external data works) and
`openvino.save_model` writes the IR into a staging folder beside the target, with `compress_to_fp16=False`: the
weights stay float32 (OpenVINO's default halves them, which is a different function; use onnx-fp16 for that).
The staged IR itself is then compiled on the CPU plugin (precision hint f32, `cnnc.runtime.openvino_cpu`) and run
on the seeded inputs against the reference on onnxruntime (`check_runner`, float32 tolerance); only a proven IR
is moved in, `.bin` first, then the `.xml` that points at it.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from cnnc.errors import ModelError, UsageError
from cnnc.export.proof import require_proven
from cnnc.export.staging import move_in, staging_folder
from cnnc.io import backend
from cnnc.runtime.equivalence import check_runner
from cnnc.runtime.openvino_cpu import compile_ir, ir_candidate, openvino_module
from cnnc.runtime.session import first_line


def export_openvino(model: onnx.ModelProto, reference: onnx.ModelProto, path: Path, check: dict, options,
                    notes: list[str]) -> tuple[dict, list[Path]]:
    if path.suffix.lower() != ".xml":
        raise UsageError(f"an OpenVINO IR is written as NAME.xml (+ NAME.bin): got -o {path}")
    ov = openvino_module()
    folder = path.parent if str(path.parent) else Path(".")
    with staging_folder(folder, notes) as staging:
        staged_xml = staging / path.name
        source = staging / "source" / "model.onnx"  # a file, so that models with external data convert too
        source.parent.mkdir()
        backend.save(model, source)
        try:
            converted = ov.convert_model(str(source))
            ov.save_model(converted, str(staged_xml), compress_to_fp16=False)
        except Exception as error:  # noqa: BLE001 - OpenVINO's converter raises its own ovc Error and RuntimeError
            raise ModelError(f"OpenVINO cannot convert the model: {first_line(error)}") from None
        expected = [o.name for o in reference.graph.output]
        proofs = {"OpenVINO CPU": check_runner(reference, ir_candidate(compile_ir(staged_xml), expected), **check)}
        require_proven("openvino", proofs)
        bin_path = path.with_suffix(".bin")
        # The .xml and .bin are one unit: the old pair is kept aside until the new one is in, and put back if the
        # second move fails, so a reader never finds a new .bin beside an old .xml.
        old_bin = staged_xml.with_name("previous.bin")
        if bin_path.exists():
            os.replace(bin_path, old_bin)
        try:
            move_in(staged_xml.with_suffix(".bin"), bin_path)
            move_in(staged_xml, path)
        except BaseException:
            if old_bin.exists():
                os.replace(old_bin, bin_path)
            raise
    return proofs, [path, bin_path]
