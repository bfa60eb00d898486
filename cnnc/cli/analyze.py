"""`cnnc analyze` (seed 001: perturbation from identity): per residual block, how far it is from the identity.

The maths is `cnnc.analysis.perturbation`; this module parses options, prints the report and writes the JSON, then
the plot (last: without matplotlib the JSON is still written and the command ends with one error line, exit 2).
"""

from __future__ import annotations

import click

from cnnc.analysis.perturbation import format_report, measure_perturbations, plot_report
from cnnc.cli.loading import load_graph, samples
from cnnc.cli.outputs import Outputs
from cnnc.errors import UsageError


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
    graph = load_graph(model, fold_bn=False)
    report = measure_perturbations(graph, samples(graph, inputs, random, seed, default=32), eps=eps, chunk=chunk)
    click.echo(format_report(report))
    outputs = Outputs()
    outputs.json("--json", json_path, report.as_dict())
    if plot_path and not report.blocks:
        raise UsageError("no residual blocks to plot")
    outputs.plot("--plot", plot_path, lambda path: plot_report(report, path))
    outputs.finish()
