"""Options shared by several commands: the equivalence-check group and batch-size lists."""

from __future__ import annotations

import click

from cnnc.errors import UsageError

_CHECK_OPTIONS = [
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


def check_options(function):
    """The equivalence-check options of `compile` and `verify`: check_n, seed, rtol, atol, input_shapes, inputs."""
    for option in reversed(_CHECK_OPTIONS):
        function = option(function)
    return function


def parse_batches(text: str | None) -> list[int] | None:
    """`"1,64"` -> [1, 64]; None -> None (each model's own batch, 1 where it is symbolic)."""
    if text is None:
        return None
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise UsageError(f"bad --batch {text!r}; expected positive integers separated by commas, e.g. 1,64")
    return values
