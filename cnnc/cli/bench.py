"""`cnnc bench`: time ONNX models against the first one, interleaved, and write JSON / Markdown / PNG reports.

The measurement is `cnnc.runtime.bench.bench_models` (ARCHITECTURE.md); the files are `cnnc.runtime.bench_report`'s.
This module only parses options and prints. The plot is drawn last: without matplotlib the JSON and Markdown are
still written and the command ends with one error line (exit 2).
"""

from __future__ import annotations

import click

from cnnc.cli.options import parse_batches
from cnnc.cli.outputs import Outputs
from cnnc.cli.table import table
from cnnc.errors import UsageError
from cnnc.runtime import bench_report
from cnnc.runtime.bench import bench_models


@click.command("bench")
@click.argument("models", nargs=-1, required=True)
@click.option("--batch", "batch", default=None, metavar="N[,N...]",
              help="batch size(s); one interleaved comparison per size (default: the model's, 1 if symbolic)")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="auto: CUDA when onnxruntime can run it, else CPU")
@click.option("--warmup", type=click.IntRange(0, None), default=None,
              help="untimed rounds first [default: 10 on the CPU, 50 on CUDA]")
@click.option("--iters", type=click.IntRange(1, None), default=None, help="timed rounds (one call per model each)")
@click.option("--duration", type=click.FloatRange(0, None, min_open=True), default=None,
              help="seconds of timed rounds per batch size [default: 5]")
@click.option("--threads", type=click.IntRange(1, None), default=None,
              help="intra-op threads (default: onnxruntime's, one per physical core)")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D0,D1,...",
              help="shape of an input with symbolic dims besides the batch (repeatable; the batch replaces D0)")
@click.option("--label", "labels", multiple=True, help="a name per MODEL, in order (default: the file names)")
@click.option("--peers", is_flag=True, help="also time onnxsim / OnnxSlim on the first model, when installed")
@click.option("--no-cuda-graph", is_flag=True, help="on CUDA, do not try CUDA graphs")
@click.option("--cudnn-algo-search", type=click.Choice(["EXHAUSTIVE", "HEURISTIC", "DEFAULT"]),
              default="EXHAUSTIVE", show_default=True, help="cuDNN convolution algorithm search on CUDA")
@click.option("--spinning/--no-spinning", default=False, show_default=True,
              help="let onnxruntime's intra-op threads spin between calls (onnxruntime's default; off here: on 2 cores it slowed models and let one session steal cores from the next)")
@click.option("--sessions", default=1, show_default=True, type=click.IntRange(1, None),
              help="onnxruntime sessions per model, taking turns round by round; the intervals then hold the "
                   "offset between two sessions of one model (~1 %)")
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the random inputs")
@click.option("--json", "json_path", default=None, metavar="R.json", help="write the full report as JSON")
@click.option("--md", "md_path", default=None, metavar="R.md", help="write the table as Markdown")
@click.option("--plot", "plot_path", default=None, metavar="R.png", help="write a plot (needs matplotlib)")
def bench_command(models, batch, provider, warmup, iters, duration, threads, input_shapes, labels, peers,
                  no_cuda_graph, cudnn_algo_search, spinning, sessions, seed, json_path, md_path, plot_path):
    """Time MODEL [MORE...] interleaved (A B A B ...) at ORT_ENABLE_ALL; report each one's ratio to the first."""
    if iters is not None and duration is not None:
        raise UsageError("give --iters or --duration, not both")
    if labels and len(labels) != len(models):
        raise UsageError(f"{len(models)} model(s) but {len(labels)} --label(s)")
    report = bench_models(list(models), list(labels) or None, batch=parse_batches(batch), provider=provider,
                          warmup=warmup, iters=iters, duration=duration, threads=threads,
                          input_shapes=list(input_shapes), cuda_graph=not no_cuda_graph,
                          cudnn_conv_algo_search=cudnn_algo_search, spinning=spinning, peers=peers, seed=seed,
                          sessions=sessions,
                          log=lambda line: click.echo(line, err=True))
    click.echo(table(bench_report.table_rows(report), bench_report.TABLE_HEADERS))
    click.echo()
    for line in bench_report.environment_lines(report):
        click.echo(line)
    for note in list(report["notes"]) + bench_report.model_notes(report):
        click.echo(f"note: {note}")
    outputs = Outputs(announce=True)
    outputs.write("--json", json_path, lambda path: bench_report.write_json(report, path))
    outputs.write("--md", md_path, lambda path: bench_report.write_markdown(report, path))
    outputs.plot("--plot", plot_path, lambda path: bench_report.write_plot(report, path))
    outputs.finish()
