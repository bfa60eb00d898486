"""`cnnc passes`: every registered pass, whether it is exact and in the default pipeline, and its summary."""

from __future__ import annotations

import click

from cnnc.cli.table import table
from cnnc.passes import DEFAULT_PIPELINE, all_pass_classes


@click.command("passes")
def passes_command():
    """List every registered pass."""
    rows = []
    for name, cls in sorted(all_pass_classes().items()):
        default = ", default" if cls.exact and name in DEFAULT_PIPELINE else ""
        rows.append((name, f"{'exact' if cls.exact else 'approximate'}{default}: {cls.summary}"))
    click.echo(table(rows))
