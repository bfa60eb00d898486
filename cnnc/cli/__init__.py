"""The `cnnc` command line (click).

Exit codes: 0 ok; 1 equivalence failure; 2 bad input or usage; 3 internal error (a bug in cnnc). Every error is one
`error: ...` line on stderr with no traceback; `cnnc --debug ...` shows the traceback.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from pathlib import Path

import click

from cnnc.errors import CnncError, UsageError


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class _CnncGroup(click.Group):
    """Routes every failure to one `error:` line and the documented exit code, also under click's CliRunner."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = list(args) if args is not None else sys.argv[1:]
        debug = "--debug" in argv
        try:
            value = super().main(args=argv, prog_name=prog_name or "cnnc", complete_var=complete_var,
                                 standalone_mode=False, **extra)
        except click.exceptions.Exit as done:
            sys.exit(done.exit_code)
        except click.ClickException as error:
            _fail(error.format_message(), 2)
        except click.exceptions.Abort:
            _fail("aborted", 2)
        except CnncError as error:
            if debug:
                traceback.print_exc()
            _fail(str(error), error.exit_code)
        except Exception as error:  # a bug in cnnc: still one line unless --debug
            if debug:
                traceback.print_exc()
            _fail(f"internal error: {type(error).__name__}: {error} (run `cnnc --debug ...` for the traceback)", 3)
        sys.exit(value if isinstance(value, int) else 0)


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.4g}P"


def _stats_rows(before: dict, after: dict | None) -> list[tuple[str, str, str]]:
    after = after or {}
    rows = [("nodes", str(before["nodes"]), str(after.get("nodes", "")))]
    for op in sorted(set(before["ops"]) | set(after.get("ops", {}))):
        rows.append((f"  {op}", str(before["ops"].get(op, 0)), str(after.get("ops", {}).get(op, 0)) if after else ""))
    rows += [
        ("parameters", _human(before["parameters"]), _human(after["parameters"]) if after else ""),
        ("MACs (batch 1)", _human(before["macs"]), _human(after["macs"]) if after else ""),
        ("size (bytes)", _human(before["size_bytes"]), _human(after["size_bytes"]) if after else ""),
        ("IR / opset", f"{before['ir_version']} / {before['opsets'].get('ai.onnx', '-')}",
         f"{after['ir_version']} / {after['opsets'].get('ai.onnx', '-')}" if after else ""),
    ]
    for kind in ("inputs", "outputs"):
        for name, dims in before[kind].items():
            rows.append((f"{kind[:-1]} {name}", str(dims), str(after.get(kind, {}).get(name, "")) if after else ""))
    return rows


def _table(rows, headers) -> str:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _print_compile_report(report: dict) -> None:
    click.echo(_table(_stats_rows(report["before"], report["after"]), ("", "before", "after")))
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
    equivalence = report.get("equivalence")
    click.echo()
    click.echo(f"check: {equivalence['summary']}" if equivalence else "check: skipped (--no-check)")


def _write_json(path: str | None, payload: dict) -> None:
    """Write a report atomically (temporary file beside it, then os.replace): never a half-written JSON."""
    if path:
        target = Path(path)
        temporary = target.with_name(f".{target.name}.cnnc-tmp")
        try:
            temporary.write_text(json.dumps(payload, indent=2, default=str) + "\n")
            os.replace(temporary, target)
        except OSError as error:  # a typo in the path is the user's error, not an internal one
            temporary.unlink(missing_ok=True)
            raise UsageError(f"cannot write --json {path}: {error.strerror or error}") from None


def _check_options(function):
    options = [
        click.option("--check-n", default=2, show_default=True, type=click.IntRange(1, 1000),
                     help="random input batches per batch size"),
        click.option("--seed", default=0, show_default=True, type=int, help="seed of the random check inputs"),
        click.option("--rtol", default=1e-4, show_default=True, type=float, help="relative tolerance"),
        click.option("--atol", default=1e-5, show_default=True, type=float, help="absolute tolerance"),
        click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D0,D1,...",
                     help="concrete shape for an input with symbolic dims (repeatable)"),
        click.option("--inputs", "inputs", multiple=True, metavar="NAME:FILE.npy",
                     help="check on these arrays instead of random inputs (repeatable)"),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@click.group(cls=_CnncGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="show tracebacks on errors")
@click.version_option(package_name="cnnc")
def cli(debug: bool) -> None:
    """cnnc: exact algebraic compilation of convolutional networks in ONNX."""


def _load_torch_source(model: str, module_factory: str | None, input_shapes):
    from cnnc.zoo import build_example  # noqa: F401  (keeps torch import lazy)

    if not module_factory:
        raise UsageError(f"{model} is a PyTorch state dict: give --module package.module:factory to build the net")
    module_name, _, attr = module_factory.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise UsageError(f"cannot import --module {module_factory}: {error}") from None
    import torch

    from cnnc.runtime.inputs import parse_input_shapes

    shapes = parse_input_shapes(list(input_shapes))
    if len(shapes) != 1:
        raise UsageError("a PyTorch model needs exactly one --input-shape NAME:D0,D1,... for its example input")
    return factory(), torch.zeros(*next(iter(shapes.values())))


@cli.command("compile")
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
@click.option("--bench-batch", default=None, metavar="N[,N...]", help="batch size(s) for --bench")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="execution provider for --bench")
@_check_options
def compile_command(model, passes, output, json_path, no_check, verify_each, example, module_factory,
                    external_data, bench, bench_batch, provider, check_n, seed, rtol, atol, input_shapes, inputs):
    """Compile MODEL (ONNX, or a .pt state dict with --module) and prove the result equivalent."""
    from cnnc import api
    from cnnc.zoo import build_example

    if (model is None) == (example is None):
        raise UsageError("give either MODEL or --example NAME")
    example_input, state_dict = None, None
    if example is not None:
        source, example_input = build_example(example)
        output = output or f"{example}.cnnc.onnx"
    elif Path(model).suffix.lower() in (".pt", ".pth"):
        source, example_input = _load_torch_source(model, module_factory, input_shapes)
        state_dict, input_shapes = model, ()
        output = output or str(Path(model).with_suffix(".cnnc.onnx"))
    else:
        source = model
        output = output or str(Path(model).with_suffix("")) + ".cnnc.onnx"
    try:
        result = api.compile(source, passes=passes, example_input=example_input, check=not no_check,
                             check_n=check_n, seed=seed, rtol=rtol, atol=atol, input_shapes=list(input_shapes),
                             inputs=list(inputs), verify_each=verify_each, state_dict=state_dict)
    except CnncError as error:
        report = getattr(error, "report", None)
        if report:
            _write_json(json_path, report)
        raise
    if bench:  # before saving: a failure here must not leave a model at -o behind a non-zero exit code
        _bench_compiled(result, bench_batch, provider, list(input_shapes))
    result.save(output, external_data=external_data)
    _print_compile_report(result.report)
    if bench:
        _print_bench(result.report["bench"])
    click.echo(f"wrote {output}")
    _write_json(json_path, result.report)


def _bench_compiled(result, batch: str | None, provider: str, input_shapes: list[str]) -> None:
    """Time original vs compiled side by side and add the comparison to the compile report."""
    from cnnc.cli.bench import parse_batches
    from cnnc.runtime.bench import bench_models

    report = bench_models([result.original, result.model], ["original", "compiled"], batch=parse_batches(batch),
                          provider=provider, input_shapes=input_shapes, log=lambda line: click.echo(line, err=True))
    result.report["bench"] = report


def _print_bench(report: dict) -> None:
    from cnnc.runtime import bench_report

    click.echo()
    click.echo(bench_report.text_table(bench_report.table_rows(report)))
    for line in bench_report.environment_lines(report):
        click.echo(line)


@cli.command("passes")
def passes_command():
    """List every registered pass."""
    from cnnc.pipeline.contract import registered_passes

    import cnnc.passes  # noqa: F401

    passes = sorted(registered_passes().items())
    width = max(len(name) for name, _ in passes)
    for name, cls in passes:
        kind = "exact" if cls.exact else "approximate"
        default = ", default" if cls.exact and cls.default else ""
        click.echo(f"{name:{width}s}  {kind}{default}: {cls.summary}")


@cli.command("inspect")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("--schedule", is_flag=True, help="levels, widths, critical path and peak activation memory of the "
              "exporter's node order against cnnc's")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1), help="batch size for --schedule")
@click.option("--plot", default=None, metavar="PNG", help="with --schedule: draw the level structure to PNG")
def inspect_command(model, as_json, schedule, batch, plot):
    """Op counts, parameters, MACs, inputs and outputs of MODEL."""
    from cnnc.io.frontend import load_onnx
    from cnnc.ir.stats import model_stats

    loaded = load_onnx(model)
    stats = model_stats(loaded)
    schedule_text = ""
    if schedule or plot:
        from cnnc.cli.schedule import schedule_section

        stats["schedule"], schedule_text = schedule_section(loaded, batch=batch, plot=plot)
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    rows = [(row[0], row[1]) for row in _stats_rows(stats, None)]
    click.echo(_table(rows, ("", Path(model).name)))
    if schedule_text:
        click.echo("\n" + schedule_text)


@cli.command("verify")
@click.argument("model_a")
@click.argument("model_b")
@click.option("--json", "json_path", default=None, help="write the report as JSON")
@_check_options
def verify_command(model_a, model_b, json_path, check_n, seed, rtol, atol, input_shapes, inputs):
    """Check that MODEL_B computes the same function as MODEL_A (exit 1 if not)."""
    from cnnc import api

    try:
        result = api.verify(model_a, model_b, check_n=check_n, seed=seed, rtol=rtol, atol=atol,
                            input_shapes=list(input_shapes), inputs=list(inputs))
    except CnncError as error:
        if getattr(error, "report", None):
            _write_json(json_path, error.report)
        raise
    rows = [(o["name"], f"{o['max_abs']:.3g}", f"{o['mean_abs']:.3g}", f"{o['max_rel']:.3g}") for o in
            result["outputs"]]
    click.echo(_table(rows, ("output", "max abs", "mean abs", "max rel")))
    click.echo(result["summary"])
    _write_json(json_path, {"equivalence": result})


@cli.command("example")
@click.argument("name", required=False)
@click.option("-o", "--output", default=None, help="where to write the ONNX model (default: NAME.onnx)")
def example_command(name, output):
    """Write a built-in example model as ONNX (no NAME: list them)."""
    from cnnc.io import backend
    from cnnc.zoo import EXAMPLES, build_example
    from cnnc.io.frontend import from_torch

    if name is None:
        for example in EXAMPLES.values():
            click.echo(f"{example.name:16s} input {'x'.join(map(str, example.input_shape))}: {example.description}")
        return
    module, example_input = build_example(name)
    model = from_torch(module, example_input)
    model = backend.target.runnable(model)
    output = output or f"{name}.onnx"
    backend.save(model, output)
    click.echo(f"wrote {output}")


cli.add_command(importlib.import_module("cnnc.cli.bench").bench_command)  # `cnnc bench` (issue 7)
cli.add_command(importlib.import_module("cnnc.cli.analysis").analyze_command)  # `cnnc analyze` (issue 8)
cli.add_command(importlib.import_module("cnnc.cli.analysis").explain_command)  # `cnnc explain` (issue 8)


def main() -> None:
    cli.main()


if __name__ == "__main__":  # pragma: no cover
    main()
