"""`cnnc analyze` (seed 001: perturbation from identity) and `cnnc explain` (seed 003: the adjoint back-map).

Registered on the `cnnc` group at the end of `cnnc/cli.py`. The maths lives in `cnnc.analysis.perturbation` and
`cnnc.analysis.explain`; this module loads the model (BN folded by the fold-bn pass for explain, Eq. 7), parses options
and prints. `load_graph` is also what scripts and tests use to get the graph the commands see.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from cnnc.errors import ModelError, UsageError


def load_graph(model: str | Path | onnx.ModelProto, fold_bn: bool) -> gs.Graph:
    """The model as a canonical graphsurgeon graph (constants folded, shapes inferred), with BN folded by the
    fold-bn pass when `fold_bn`; a BN that cannot be folded stays, and explain then refuses it by name."""
    from cnnc.io.frontend import load_model
    from cnnc.passes.fold_bn import FoldBatchNorm
    from cnnc.pipeline.manager import run_pipeline

    proto = load_model(model) if not isinstance(model, onnx.ModelProto) else model
    try:
        graph = gs.import_onnx(proto)
    except Exception as error:  # noqa: BLE001  (graphsurgeon raises assorted types on malformed graphs)
        raise ModelError(f"cannot import the model into the IR: {error}") from None
    graph, _ = run_pipeline(graph, [FoldBatchNorm()] if fold_bn else [], strict=True)
    return graph


def _samples(graph: gs.Graph, inputs: str | None, random: int | None, seed: int, default: int) -> np.ndarray:
    from cnnc.analysis.perturbation import load_samples, sample_inputs

    if inputs and random:
        raise UsageError("give --inputs or --random, not both")
    return load_samples(graph, inputs) if inputs else sample_inputs(graph, random or default, seed)


def _write(path: str | None, write) -> None:
    if not path:
        return
    try:
        write(path)
    except OSError as error:  # a typo in the path is the user's error, not an internal one
        raise UsageError(f"cannot write {path}: {error.strerror or error}") from None


def _need_matplotlib(option: str, path: str | None) -> None:
    if path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError(f"{option} needs matplotlib: pip install 'cnnc[plot]'") from None


@click.command("analyze")
@click.argument("model")
@click.option("--inputs", default=None, metavar="X.npy", help="sample inputs (batch on axis 0)")
@click.option("--random", type=click.IntRange(1), default=None, help="N seeded uniform [0,1) samples [default: 32]")
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the random samples")
@click.option("--eps", default=0.1, show_default=True, type=click.FloatRange(0, min_open=True),
              help="ε of the stopping rule L = ceil(d_scaled / ε)")
@click.option("--chunk", default=16, show_default=True, type=click.IntRange(1), help="samples per evaluation")
@click.option("--json", "json_path", default=None, metavar="R.json", help="write the report as JSON")
@click.option("--plot", "plot_path", default=None, metavar="R.png", help="plot the perturbations per section")
def analyze_command(model, inputs, random, seed, eps, chunk, json_path, plot_path):
    """Per residual block of MODEL: absolute and scaled perturbation from identity, section distances and the
    depth the stopping rule suggests (seed 001)."""
    from cnnc.analysis.perturbation import format_report, measure_perturbations, plot_report

    _need_matplotlib("--plot", plot_path)
    graph = load_graph(model, fold_bn=False)
    samples = _samples(graph, inputs, random, seed, default=32)
    report = measure_perturbations(graph, samples, eps=eps, chunk=chunk)
    click.echo(format_report(report))
    _write(json_path, lambda p: Path(p).write_text(json.dumps(report.as_dict(), indent=2) + "\n"))
    if plot_path:
        if not report.blocks:
            raise UsageError("no residual blocks to plot")
        _write(plot_path, lambda p: plot_report(report, p))


@click.command("explain")
@click.argument("model")
@click.option("--unit", "unit", default=None, metavar="output:K | TENSOR:c,y,x", help="the unit to explain")
@click.option("--mode", type=click.Choice(["RM0", "RM1", "RM2", "RM3", "RM4"], case_sensitive=False), default=None,
              help="reconstruction mode (default: RM2 for a conv output, RM0 otherwise)")
@click.option("--input", "input_path", default=None, metavar="X.npy", help="the input sample [default: seeded "
              "uniform [0,1)]")
@click.option("--seed", default=0, show_default=True, type=int, help="seed of random inputs")
@click.option("--dataset", is_flag=True, help="data-set mode: share of units within 1 %% per layer (Tables 3-4)")
@click.option("--inputs", default=None, metavar="X.npy", help="--dataset: the inputs (batch on axis 0)")
@click.option("--random", type=click.IntRange(1), default=None, help="--dataset: N random inputs [default: 200]")
@click.option("--explicit-units", default=0, show_default=True, type=click.IntRange(0),
              help="--dataset: also reconstruct this many random units per conv layer and input, and every "
                   "output unit, from explicit reverse-mode H")
@click.option("--chunk", default=16, show_default=True, type=click.IntRange(1), help="inputs per evaluation")
@click.option("--list", "list_units", is_flag=True, help="list the conv layers and outputs that --unit can name")
@click.option("--json", "json_path", default=None, metavar="R.json", help="write the result as JSON")
@click.option("--md", "md_path", default=None, metavar="R.md", help="--dataset: write the table as Markdown")
@click.option("--png", "png_path", default=None, metavar="H.png", help="draw a heat map of H_I")
def explain_command(model, unit, mode, input_path, seed, dataset, inputs, random, explicit_units, chunk, list_units,
                    json_path, md_path, png_path):
    """Write a unit of a ReLU/LeakyReLU network as <x, H_I> + <x_b, H_b> (seed 003's adjoint back-map)."""
    from cnnc.analysis.perturbation import load_samples, sample_inputs
    from cnnc.analysis.explain import BackMap, format_dataset_table, plot_hypersurface

    _need_matplotlib("--png", png_path)
    backmap = BackMap(load_graph(model, fold_bn=True))
    if list_units:
        for row in backmap.list_units():
            click.echo(f"{row['tensor']}  {row['op']} '{row['node']}'  per-sample shape {row['shape']}  "
                       f"modes {','.join(row['modes'])}")
        return
    if dataset:
        if unit or png_path or input_path:
            raise UsageError("--dataset takes --inputs/--random, not --unit, --input or --png")
        samples = _samples(backmap.graph, inputs, random, seed, default=200)
        table = backmap.dataset_table(samples, chunk=chunk, explicit_units=explicit_units,
                                      explicit_outputs=explicit_units > 0, seed=seed)
        text = format_dataset_table(table, title=Path(model).name)
        click.echo(text)
        _write(json_path, lambda p: Path(p).write_text(json.dumps(table, indent=2) + "\n"))
        _write(md_path, lambda p: Path(p).write_text(text + "\n"))
        return
    if unit is None:
        raise UsageError("give --unit output:K or --unit TENSOR:c,y,x (or --dataset, or --list)")
    if inputs or random or md_path:
        raise UsageError("--inputs, --random and --md belong to --dataset; one sample is given with --input")
    sample = load_samples(backmap.graph, input_path) if input_path else sample_inputs(backmap.graph, 1, seed)
    if sample.shape[0] != 1:
        raise UsageError(f"--input holds {sample.shape[0]} samples; explain takes one (or use --dataset)")
    explanation = backmap.explain(sample, unit, mode)
    click.echo(f"unit {explanation.unit.tensor}{list(explanation.unit.index)} ({explanation.unit.mode})")
    click.echo(f"true value           {explanation.true_value:.17g}")
    click.echo(f"reconstructed value  {explanation.reconstructed_value:.17g}  = <x,H_I> + <x_b,H_b>")
    click.echo(f"relative error       {explanation.relative_error:.3g}")
    click.echo(f"H_I shape {list(explanation.H_I.shape)}, H_b shape {list(explanation.H_b.shape)} "
               f"({len(explanation.biases)} bias vectors)")
    for part in explanation.parts:
        click.echo(f"  in-channel {part['in_channel']}: true {part['true_value']:.6g}, reconstructed "
                   f"{part['reconstructed_value']:.6g}, relative error {part['relative_error']:.2g}")
    for note in explanation.notes:
        click.echo(f"note: {note}")
    _write(json_path, lambda p: Path(p).write_text(json.dumps(explanation.as_dict(), indent=1) + "\n"))
    _write(png_path, lambda p: plot_hypersurface(explanation, p))
