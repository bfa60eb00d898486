"""`cnnc passes`: every registered pass, its kind (exact, approximate, housekeeping), whether it is in the default
pipeline, and its summary."""

from __future__ import annotations

import click

from cnnc.cli.table import table
from cnnc.passes import DEFAULT_PIPELINE, all_pass_classes


@click.command("passes")
def passes_command():
    """List every registered pass."""
    rows = []
    for name, cls in sorted(all_pass_classes().items()):
        default = ", default" if name in DEFAULT_PIPELINE else ""
        rows.append((name, f"{cls.kind}{default}: {cls.summary}"))
    click.echo(table(rows))
