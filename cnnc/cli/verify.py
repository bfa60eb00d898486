"""`cnnc verify A B`: does B compute the same function as A on seeded inputs (exit 1 if not)."""

from __future__ import annotations

import click

from cnnc import api
from cnnc.cli.options import check_options
from cnnc.cli.outputs import write_json
from cnnc.cli.table import table
from cnnc.errors import CnncError


@click.command("verify")
@click.argument("model_a")
@click.argument("model_b")
@click.option("--json", "json_path", default=None, help="write the report as JSON")
@check_options
def verify_command(model_a, model_b, json_path, check_n, seed, rtol, atol, input_shapes, inputs):
    """Check that MODEL_B computes the same function as MODEL_A (exit 1 if not)."""
    try:
        result = api.verify(model_a, model_b, check_n=check_n, seed=seed, rtol=rtol, atol=atol,
                            input_shapes=list(input_shapes), inputs=list(inputs))
    except CnncError as error:
        if getattr(error, "report", None):
            write_json("--json", json_path, error.report)
        raise
    rows = [(o["name"], o["dtype"], f"{o['rtol']:g} / {o['atol']:g}", f"{o['max_abs']:.3g}", f"{o['mean_abs']:.3g}",
             f"{o['max_rel']:.3g}") for o in result["outputs"]]
    click.echo(table(rows, ("output", "dtype", "rtol / atol", "max abs", "mean abs", "max rel")))
    click.echo(result["summary"])
    write_json("--json", json_path, {"equivalence": result})
