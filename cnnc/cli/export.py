"""`cnnc export COMPILED.onnx --format F -o OUT`: write a deployment artefact, proven on its own runtime first
(`cnnc.export`). Also the options `cnnc compile --format F` shares (`export_options`)."""

from __future__ import annotations

from pathlib import Path

import click

from cnnc.cli.options import check_options, parse_batches
from cnnc.cli.outputs import write_json
from cnnc.errors import CnncError
from cnnc.export import FORMATS, ExportOptions, ExportResult, export_model

_EXPORT_OPTIONS = [
    click.option("--keep-io-types/--no-keep-io-types", "export_keep_io_types", default=True, show_default=True,
                 help="onnx-fp16: keep float32 inputs and outputs (Casts at the borders)"),
    click.option("--triton-name", default=None, help="triton: the model's name (default: the model file's stem)"),
    click.option("--batch", "export_batch", default=None, metavar="N[,N...]",
                 help="triton: preferred batch sizes (max_batch_size: the largest; default 8); tensorrt: the "
                 "optimisation profile's largest batch"),
    click.option("--triton-tensorrt-fp16", is_flag=True,
                 help="triton: onnxruntime's TensorRT accelerator in FP16; tensorrt: build the engine in FP16"),
]


def export_options(function):
    for option in reversed(_EXPORT_OPTIONS):
        function = option(function)
    return function


def make_options(external_data, keep_io_types, triton_name, batch, tensorrt_fp16) -> ExportOptions:
    return ExportOptions(external_data=external_data, keep_io_types=keep_io_types, name=triton_name,
                         batches=tuple(parse_batches(batch) or ()), tensorrt_fp16=tensorrt_fp16)


def print_export(result: ExportResult) -> None:
    for runtime, proof in result.report["proofs"].items():
        click.echo(f"check ({result.format} on {runtime}): {proof['summary']}")
    for note in result.report["notes"]:
        click.echo(f"note: {note}")
    click.echo(f"wrote {', '.join(result.report['written'])}")


@click.command("export")
@click.argument("model")
@click.option("--format", "format_", type=click.Choice(FORMATS), required=True, help="the deployment format")
@click.option("-o", "--output", required=True, help="onnx/onnx-fp16: FILE.onnx; openvino: FILE.xml (+ FILE.bin); "
              "triton: the repository folder (OUT/<name>/1/model.onnx, OUT/<name>/config.pbtxt); tensorrt: FILE")
@click.option("--external-data/--no-external-data", default=None,
              help="onnx, onnx-fp16, triton: force or forbid external data (default: only above 2 GB)")
@export_options
@click.option("--json", "json_path", default=None, help="write the export report (proofs per runtime) as JSON")
@check_options
def export_command(model, format_, output, external_data, export_keep_io_types, triton_name, export_batch,
                   triton_tensorrt_fp16, json_path, check_n, seed, rtol, atol, input_shapes, inputs):
    """Export MODEL (a compiled ONNX file) as --format, proven equivalent on that format's runtime."""
    options = make_options(external_data, export_keep_io_types, triton_name or None, export_batch,
                           triton_tensorrt_fp16)
    check = {"n": check_n, "seed": seed, "rtol": rtol, "atol": atol, "input_shapes": list(input_shapes),
             "user_inputs": list(inputs)}
    if triton_name is None and format_ == "triton":
        options = make_options(external_data, export_keep_io_types, Path(model).name.split(".")[0], export_batch,
                               triton_tensorrt_fp16)
    try:
        result = export_model(model, format_, output, options, check=check)
    except CnncError as error:
        report = getattr(error, "report", None)
        if report:
            write_json("--json", json_path, report)
        raise
    print_export(result)
    write_json("--json", json_path, result.report)
