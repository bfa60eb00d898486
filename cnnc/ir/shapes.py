"""Symbolic dims into concrete ones: the one rule every tool that must run a model on made-up inputs follows.

A declared dim is fixed when it is an integer >= 0 (a zero-size dim is a real size: ONNX writes an unknown dim
without a dim_value). A symbolic one (a `dim_param` string, '?', None) on
the leading axis is the batch and takes the batch size the caller runs at; a symbolic dim on any other axis cannot
be guessed (an image side, a sequence length) and is a UsageError whose hint says how to give it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cnnc.errors import UsageError


def is_fixed(dim) -> bool:
    """True for an integer dim >= 0 (numpy integers included, bools not); 0 is a real, empty size."""
    return isinstance(dim, (int, np.integer)) and not isinstance(dim, bool) and dim >= 0


def concrete_shape(name: str, dims: Sequence, batch: int, hint: str) -> tuple[int, ...]:
    """`dims` of input `name` with a symbolic leading dim replaced by `batch`; any other symbolic dim raises a
    UsageError ending in `hint` (e.g. "give it with --input-shape x:d0,d1,...")."""
    shape = []
    for axis, dim in enumerate(dims):
        if is_fixed(dim):
            shape.append(int(dim))
        elif axis == 0:
            shape.append(batch)
        else:
            raise UsageError(f"input '{name}' has symbolic dim {dim!r} at axis {axis}; {hint}")
    return tuple(shape)
