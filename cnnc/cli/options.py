"""Options shared by several commands: the equivalence-check group and batch-size lists."""

from __future__ import annotations

import click

from cnnc.errors import UsageError

_CHECK_OPTIONS = [
    click.option("--check-n", default=2, show_default=True, type=click.IntRange(1, 1000),
                 help="random input batches per batch size"),
    click.option("--seed", default=0, show_default=True, type=int, help="seed of the random check inputs"),
    click.option("--rtol", default=None, type=click.FloatRange(min=0), help="relative tolerance for every output "
                 "(default: per output dtype: float32 1e-4, float16 2e-2, bfloat16 5e-2, float64 1e-9, integers 0)"),
    click.option("--atol", default=None, type=click.FloatRange(min=0), help="absolute tolerance for every output "
                 "(default: per output dtype: float32 1e-5, float16 2e-3, bfloat16 5e-3, float64 1e-11, integers 0)"),
    click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D0,D1,...",
                 help="concrete shape for an input with symbolic dims (repeatable)"),
    click.option("--inputs", "inputs", multiple=True, metavar="NAME:FILE.npy",
                 help="check on these arrays instead of random inputs (repeatable)"),
]


def check_options(function):
    """The equivalence-check options of `compile` and `verify`: check_n, seed, rtol, atol, input_shapes, inputs.

    rtol and atol are None unless given: the check then takes each output's dtype's tolerance
    (`cnnc.io.precision.TOLERANCES`); given, they apply to every output whatever its dtype."""
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
