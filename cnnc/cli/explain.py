"""`cnnc explain` (seed 003: the adjoint back-map): a unit of a ReLU/LeakyReLU network as <x, H_I> + <x_b, H_b>.

The maths is `cnnc.analysis.backmap` and its uses (on the graph with BN folded, Eq. 7); this module parses options,
prints, and writes the JSON / Markdown, then the heat map (last: without matplotlib the other files are still written and the
command ends with one error line, exit 2).
"""

from __future__ import annotations

from pathlib import Path

import click

from cnnc.analysis.backmap import BackMap
from cnnc.analysis.backmap_dataset import dataset_table
from cnnc.analysis.backmap_report import format_dataset_table, plot_hypersurface
from cnnc.analysis.explain import explain_unit
from cnnc.analysis.samples import load_samples, sample_inputs
from cnnc.cli.loading import load_graph, samples
from cnnc.cli.outputs import Outputs
from cnnc.cli.table import table
from cnnc.errors import UsageError


def _echo_explanation(explanation) -> None:
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
    backmap = BackMap(load_graph(model, fold_bn=True))
    outputs = Outputs()
    if list_units:
        click.echo(table((row["tensor"], f"{row['op']} '{row['node']}'", f"per-sample shape {row['shape']}",
                          f"modes {','.join(row['modes'])}") for row in backmap.list_units()))
        return
    if dataset:
        if unit or png_path or input_path:
            raise UsageError("--dataset takes --inputs/--random, not --unit, --input or --png")
        chosen = samples(backmap.graph, inputs, random, seed, default=200)
        result = dataset_table(backmap, chosen, chunk=chunk, explicit_units=explicit_units,
                                       explicit_outputs=explicit_units > 0, seed=seed)
        text = format_dataset_table(result, title=Path(model).name)
        click.echo(text)
        outputs.json("--json", json_path, result)
        outputs.text("--md", md_path, text + "\n")
        return
    if unit is None:
        raise UsageError("give --unit output:K or --unit TENSOR:c,y,x (or --dataset, or --list)")
    if inputs or random or md_path:
        raise UsageError("--inputs, --random and --md belong to --dataset; one sample is given with --input")
    sample = load_samples(backmap.graph, input_path) if input_path else sample_inputs(backmap.graph, 1, seed)
    if sample.shape[0] != 1:
        raise UsageError(f"--input holds {sample.shape[0]} samples; explain takes one (or use --dataset)")
    explanation = explain_unit(backmap, sample, unit, mode)
    _echo_explanation(explanation)
    outputs.json("--json", json_path, explanation.as_dict(), indent=1)
    outputs.plot("--png", png_path, lambda path: plot_hypersurface(explanation, path))
    outputs.finish()
