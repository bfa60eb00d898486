"""`cnnc example [NAME]`: list the built-in models (`cnnc.zoo`) or write one as a runnable ONNX file."""

from __future__ import annotations

import click

from cnnc.cli.table import table
from cnnc.io import backend
from cnnc.io.frontend import from_torch
from cnnc.zoo import EXAMPLES, build_example


@click.command("example")
@click.argument("name", required=False)
@click.option("-o", "--output", default=None, help="where to write the ONNX model (default: NAME.onnx)")
def example_command(name, output):
    """Write a built-in example model as ONNX (no NAME: list them)."""
    if name is None:
        click.echo(table((example.name, f"input {'x'.join(map(str, example.input_shape))}: {example.description}")
                         for example in EXAMPLES.values()))
        return
    module, example_input = build_example(name)
    model = backend.target.runnable(from_torch(module, example_input))
    output = output or f"{name}.onnx"
    backend.save(model, output)
    click.echo(f"wrote {output}")
