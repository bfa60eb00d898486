"""`cnnc compile`: load a model (ONNX file, .pt state dict with --module, or a built-in example), run the passes
through `cnnc.api.compile`, prove the result equivalent, optionally time it, write it atomically and print the
report (before/after table, one paragraph per pass, the check)."""

from __future__ import annotations

import importlib
from pathlib import Path

import click
import torch

from cnnc import api
from cnnc.cli.export import make_options, print_export
from cnnc.cli.options import check_options, parse_batches
from cnnc.cli.outputs import write_json
from cnnc.cli.table import stats_rows, table
from cnnc.errors import CnncError, UsageError
from cnnc.export import FORMATS
from cnnc.pipeline.manager import MAX_NODES
from cnnc.runtime import bench_report
from cnnc.runtime.bench import bench_models
from cnnc.runtime.inputs import parse_input_shapes
from cnnc.zoo import build_example


def _load_torch_source(model: str, module_factory: str | None, input_shapes):
    """(module, example input) of a .pt/.pth state dict: the network is built by the user's --module factory."""
    if not module_factory:
        raise UsageError(f"{model} is a PyTorch state dict: give --module package.module:factory to build the net")
    module_name, _, attr = module_factory.partition(":")
    try:  # the user's own code, named on the command line: the one import that must happen at run time
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise UsageError(f"cannot import --module {module_factory}: {error}") from None
    shapes = parse_input_shapes(list(input_shapes))
    if len(shapes) != 1:
        raise UsageError("a PyTorch model needs exactly one --input-shape NAME:D0,D1,... for its example input")
    return factory(), torch.zeros(*next(iter(shapes.values())))


# The default -o per --format (None: the compiled ONNX model itself).
_OUTPUT_SUFFIX = {None: ".cnnc.onnx", "onnx": ".cnnc.onnx", "onnx-fp16": ".cnnc.fp16.onnx", "openvino": ".cnnc.xml",
                  "triton": ".cnnc-triton", "tensorrt": ".cnnc.plan"}


def print_compile_report(report: dict) -> None:
    click.echo(table(stats_rows(report["before"], report["after"]), ("", "before", "after")))
    click.echo()
    for record in report["passes"]:
        status = "changed" if record["changed"] else "no change"
        click.echo(f"pass {record['pass']} ({'exact' if record['exact'] else 'approximate'}): {status}, "
                   f"{len(record['applied'])} rewrite(s), {record['seconds'] * 1000:.1f} ms")
        if record["error"]:
            click.echo(f"  FAILED and rolled back: {record['error']}")
        for line in record["applied"]:
            click.echo(f"  + {line}")
        for skip in record["skipped"]:
            click.echo(f"  - skipped {skip['where']}: {skip['why']}")
    for note in report.get("order_notes", []) + report.get("notes", []):
        click.echo(f"note: {note}")
    if report.get("housekeeping"):
        click.echo("housekeeping: " + ", ".join(f"{r['pass']} {r['runs']}× {r['seconds'] * 1000:.1f} ms"
                                                 for r in report["housekeeping"]))
    if report.get("auto"):
        _print_auto(report["auto"])
    equivalence = report.get("equivalence")
    click.echo()
    click.echo(f"check: {equivalence['summary']}" if equivalence else "check: skipped (--no-check)")


def _ratio_text(per_batch: dict) -> str:
    return ", ".join(f"batch {batch} ×{r['ratio']:.3g} [{r['ci95'][0]:.3g}, {r['ci95'][1]:.3g}]"
                     for batch, r in per_batch.items())


def _print_auto(auto: dict) -> None:
    """The decisions of --auto: latency ratios (< 1: faster) with their 95 % intervals."""
    click.echo()
    click.echo(f"auto on {auto['device']}, batch {','.join(map(str, auto['batches']))}, {auto['duration_s']:g} s per "
               f"comparison and batch: {auto['close_candidates']} close candidate(s), {len(auto['kept'])} kept "
               f"({auto['seconds']:.1f} s)")
    for decision in auto["decisions"]:
        looks = f" ({decision['looks']} timings pooled)" if decision.get("looks", 1) > 1 else ""
        click.echo(f"  {decision['decision']} {decision['pass']} {decision['id']} ({decision['where']}): "
                   f"vs {decision['against']} {_ratio_text(decision['ratios'])}{looks}")
    for skipped in auto["not_timed"]:
        click.echo(f"  not timed {skipped['pass']} {skipped['id']}: {skipped['why']}")
    for name, per_batch in auto["final"].items():
        click.echo(f"  {name.replace('_', ' ')}: {_ratio_text(per_batch)}")
    if auto.get("final_looks", 1) > 1 or "budget" in auto.get("final_stop", ""):
        click.echo(f"  final comparison: {auto['final_looks']} timing(s) on new sessions, pooled: {auto['final_stop']}")
    if auto.get("simplified_note"):
        click.echo(f"  note: {auto['simplified_note']}")
    click.echo(f"  emitted: {auto['emitted']} ({auto['why']})")


def _bench_compiled(result, batch: str | None, provider: str, input_shapes: list[str]) -> None:
    """Time original vs compiled side by side and add the comparison to the compile report."""
    report = bench_models([result.original, result.model], ["original", "compiled"], batch=parse_batches(batch),
                          provider=provider, input_shapes=input_shapes, log=lambda line: click.echo(line, err=True))
    result.report["bench"] = report


def _print_bench(report: dict) -> None:
    click.echo()
    click.echo(table(bench_report.table_rows(report), bench_report.TABLE_HEADERS))
    for line in bench_report.environment_lines(report):
        click.echo(line)


@click.command("compile")
@click.argument("model", required=False)
@click.option("--passes", "passes", default=None, help="comma-separated passes with options, e.g. "
              "'fold-bn,destride{mode=network}' (default: every default exact pass)")
@click.option("-o", "--output", default=None, help="output path (default: <model>.cnnc.onnx)")
@click.option("--json", "json_path", default=None, help="write the report as JSON")
@click.option("--no-check", is_flag=True, help="skip the equivalence check (not recommended)")
@click.option("--verify-each", is_flag=True, help="check equivalence after every pass; names the pass that broke it")
@click.option("--example", default=None, help="compile a built-in example model instead of MODEL")
@click.option("--module", "module_factory", default=None, metavar="PKG.MOD:FACTORY",
              help="for a .pt/.pth state dict: the function that builds the network")
@click.option("--external-data/--no-external-data", default=None,
              help="force or forbid external data (default: only above 2 GB)")
@click.option("--bench", "bench", is_flag=True,
              help="also time the original against the compiled model (interleaved, ORT_ENABLE_ALL)")
@click.option("--bench-batch", default=None, metavar="N[,N...]", help="batch size(s) for --bench and --auto "
              "(--auto default: 1)")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="execution provider for --bench, --auto and the cost model (auto: CUDA when present)")
@click.option("--auto", "auto", is_flag=True, help="time each rewrite the cost model calls close and keep it only "
              "when faster with confidence (by 1 % at least); emit the compiled model, else the simplified graph, only "
              "when it pays against the input, else the input unchanged")
@click.option("--auto-seconds", default=1.0, show_default=True, type=click.FloatRange(min=0.01),
              help="--auto: timed seconds per comparison and batch size")
@click.option("--auto-budget", default=60.0, show_default=True, type=click.FloatRange(min=0.1),
              help="--auto: total seconds for the search (builds included); the final comparison always runs")
@click.option("--precision", type=click.Choice(api.PRECISIONS), default="fp32", show_default=True,
              help="fp16: convert the result to float16 after the passes and check it against the float32 original "
              "at float16's tolerance (rtol 2e-2, atol 2e-3)")
@click.option("--keep-io-types/--no-keep-io-types", default=True, show_default=True,
              help="with --precision fp16: keep float32 inputs and outputs (Casts at the borders)")
@click.option("--max-nodes", default=MAX_NODES, show_default=True, type=click.IntRange(min=0),
              help="refuse models with more nodes (about where a compile of a graph no pass rewrites reaches 30 s, "
              "bench/scale.py); 0: no limit")
@click.option("--format", "export_format", type=click.Choice(FORMATS), default=None,
              help="also export the result in this deployment format to -o (see `cnnc export`), proven on its runtime")
@click.option("--triton-name", default=None, help="--format triton: the model's name (default: the output's stem)")
@click.option("--export-batch", default=None, metavar="N[,N...]",
              help="--format triton: preferred batch sizes (max_batch_size: the largest; default 8); tensorrt: the "
              "optimisation profile's largest batch")
@click.option("--triton-tensorrt-fp16", is_flag=True,
              help="--format triton: onnxruntime's TensorRT accelerator in FP16; tensorrt: an FP16 engine")
@check_options
def compile_command(model, passes, output, json_path, no_check, verify_each, example, module_factory,
                    external_data, bench, bench_batch, provider, auto, auto_seconds, auto_budget, precision,
                    keep_io_types, max_nodes, export_format, triton_name, export_batch, triton_tensorrt_fp16, check_n, seed,
                    rtol, atol, input_shapes, inputs):
    """Compile MODEL (ONNX, or a .pt state dict with --module) and prove the result equivalent."""
    if (model is None) == (example is None):
        raise UsageError("give either MODEL or --example NAME")
    example_input, state_dict = None, None
    if export_format == "triton" and output is not None and Path(output).suffix.lower() == ".onnx":
        raise UsageError(f"--format triton writes a model repository folder: give -o a folder, not {output}")
    suffix = _OUTPUT_SUFFIX[export_format]
    if example is not None:
        source, example_input = build_example(example)
        output = output or f"{example}{suffix}"
    elif Path(model).suffix.lower() in (".pt", ".pth"):
        source, example_input = _load_torch_source(model, module_factory, input_shapes)
        state_dict, input_shapes = model, ()
        output = output or str(Path(model).with_suffix("")) + suffix
    else:
        source = model
        output = output or str(Path(model).with_suffix("")) + suffix
    try:
        result = api.compile(source, passes=passes, example_input=example_input, check=not no_check,
                             check_n=check_n, seed=seed, rtol=rtol, atol=atol, input_shapes=list(input_shapes),
                             inputs=list(inputs) or None, verify_each=verify_each, state_dict=state_dict,
                             provider=provider,
                             auto=api.AutoSettings(duration_s=auto_seconds, budget_s=auto_budget, seed=seed)
                             if auto else False, batches=parse_batches(bench_batch) or [1], precision=precision,
                             keep_io_types=keep_io_types, max_nodes=max_nodes)
    except CnncError as error:
        report = getattr(error, "report", None)
        if report:
            write_json("--json", json_path, report)
        raise
    if bench:  # before saving: a failure here must not leave a model at -o behind a non-zero exit code
        _bench_compiled(result, bench_batch, provider, list(input_shapes))
    exported = None
    if export_format is not None:  # proven on its runtime against the original, written only then
        options = make_options(external_data, keep_io_types, triton_name or Path(output).name.split(".")[0],
                               export_batch, triton_tensorrt_fp16)
        exported = result.export(export_format, output, options, check={
            "n": check_n, "seed": seed, "rtol": rtol, "atol": atol, "input_shapes": list(input_shapes),
            "user_inputs": list(inputs)})
    else:
        result.save(output, external_data=external_data)
    print_compile_report(result.report)
    if bench:
        _print_bench(result.report["bench"])
    if exported is not None:
        print_export(exported)
    else:
        click.echo(f"wrote {output}")
    write_json("--json", json_path, result.report)
