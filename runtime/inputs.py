"""Inputs for equivalence checks: seeded random batches, or the user's `.npy` files.

Every graph input gets a concrete shape: fixed dims as declared; the leading symbolic dim is the batch (checked at
batch 1 and at a second batch size); other symbolic dims must be given (`--input-shape name:d0,d1,...`).
Float inputs alternate between uniform [0, 1) and normal N(0, 1) batches; integers are 0..3, except inputs that
are op parameters (axes, shapes, indices, split sizes, divisors: `cnnc.runtime.parameter_inputs`), drawn within the
op's constraints. Zero-size dims are real sizes; 0-d inputs are 0-d arrays. An input with a default (IR >= 4) is fed
random values like any other, and one more feed omits it, so that both models run on their defaults too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from cnnc.errors import UsageError
from cnnc.io.precision import is_float
from cnnc.ir.graph import shadowed_input_names
from cnnc.ir.shapes import concrete_shape, is_fixed
from cnnc.runtime.parameter_inputs import draw_parameters, parameter_roles, static_shapes

SECOND_BATCH = 3  # an odd batch size: catches rewrites that hard-code batch 1 or an even batch


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    dims: tuple  # ints, or strings for symbolic dims
    has_default: bool = False  # an initializer of the same name is its default (IR >= 4): the input may be omitted


def graph_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller may feed: all graph inputs, including those with a default (IR >= 4); before IR 4 an
    input that is also an initializer is a constant, not an input."""
    initializers = {init.name for init in model.graph.initializer}
    with_default = set(shadowed_input_names(model.graph, model.ir_version))
    specs = []
    for value in model.graph.input:
        if value.name in initializers and value.name not in with_default:
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, dtype, dims, value.name in with_default))
    return specs


def parse_input_shapes(items: list[str] | dict | None) -> dict[str, tuple[int, ...]]:
    """`["x:1,3,224,224"]` or `{"x": (1, 3, 224, 224)}` into a dict."""
    if not items:
        return {}
    if isinstance(items, dict):
        return {name: tuple(int(d) for d in dims) for name, dims in items.items()}
    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d <= 0 for d in shape):
            raise UsageError(f"bad --input-shape {item!r}; expected name:d0,d1,... with positive dims")
        shapes[name] = shape
    return shapes


def load_user_inputs(items: list[str] | dict | None) -> dict[str, np.ndarray]:
    """`["x:file.npy"]` or `{"x": array}` into a dict of arrays (never unpickled: allow_pickle=False)."""
    if not items:
        return {}
    if isinstance(items, dict):
        return {name: np.asarray(value) for name, value in items.items()}
    arrays = {}
    for item in items:
        name, sep, path = item.partition(":")
        if not sep or not name or not path:
            raise UsageError(f"bad --inputs {item!r}; expected name:file.npy")
        try:
            arrays[name] = np.load(Path(path), allow_pickle=False)
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot read --inputs {item!r}: {error}") from None
    return arrays


def _concrete_shapes(specs: list[InputSpec], given: dict[str, tuple[int, ...]], batch: int) -> dict:
    shapes = {}
    for spec in specs:
        if spec.name in given:
            shape = given[spec.name]
            if len(shape) != len(spec.dims) or any(is_fixed(d) and d != g
                                                   for d, g in zip(spec.dims, shape)):
                raise UsageError(f"--input-shape {spec.name}:{shape} does not fit its declared shape {spec.dims}")
            shapes[spec.name] = shape
            continue
        shapes[spec.name] = concrete_shape(spec.name, spec.dims, batch, shape_hint(spec.name))
    return shapes


def shape_hint(name: str) -> str:
    """How a user gives the symbolic dims of input `name`: through the API and on the command line."""
    return f"give it with input_shapes={{'{name}': (d0, d1, ...)}} (--input-shape {name}:d0,d1,... on the command line)"


def has_dynamic_batch(specs: list[InputSpec]) -> bool:
    return any(spec.dims and not is_fixed(spec.dims[0]) for spec in specs)


def random_array(rng: np.random.Generator, shape: tuple, dtype: np.dtype, normal: bool) -> np.ndarray:
    """Floats N(0, 1) (`normal`) or uniform [0, 1), booleans at random, integers in 0..3 (valid as small indices)."""
    if is_float(dtype):  # numpy's floats and ml_dtypes' bfloat16 (numpy kind 'V'): drawn in float64, rounded once
        values = rng.standard_normal(shape) if normal else rng.random(shape)
        return np.asarray(values).astype(dtype)
    if dtype == np.bool_:
        return np.asarray(rng.random(shape) < 0.5)  # an array even at 0-d (onnxruntime takes no numpy scalar)
    return np.asarray(rng.integers(0, 4, size=shape)).astype(dtype)


def make_input_batches(model: onnx.ModelProto, n: int = 2, seed: int = 0, input_shapes=None,
                       user_inputs=None) -> list[dict[str, np.ndarray]]:
    """`n` feeds per batch size (1, and SECOND_BATCH when the batch is dynamic), or the user's arrays."""
    specs = graph_inputs(model)
    arrays = load_user_inputs(user_inputs)
    if arrays:
        missing = [spec.name for spec in specs if spec.name not in arrays and not spec.has_default]
        if missing:
            raise UsageError(f"--inputs gives no array for input(s) {', '.join(missing)}")
        return [{spec.name: arrays[spec.name].astype(spec.dtype, copy=False) for spec in specs
                 if spec.name in arrays}]
    given = parse_input_shapes(input_shapes)
    unknown = set(given) - {spec.name for spec in specs}
    if unknown:
        raise UsageError(f"--input-shape names unknown input(s) {', '.join(sorted(unknown))}")
    batches = [1, SECOND_BATCH] if has_dynamic_batch(specs) and not given else [None]
    rng = np.random.default_rng(seed)
    roles = parameter_roles(model)  # inputs that are op parameters (axes, shapes, indices...): drawn valid
    known = static_shapes(model) if roles else {}
    feeds = []
    for batch in batches:
        shapes = _concrete_shapes(specs, given, batch if batch is not None else 1)
        for index in range(max(n, 1)):
            normal = index % 2 == 1
            feeds.append({spec.name: random_array(rng, shapes[spec.name], spec.dtype, normal) for spec in specs})
            draw_parameters(roles, feeds[-1], known, rng)
    if any(spec.has_default for spec in specs):  # and once with every default: the feed omits those inputs
        feeds.append({name: value for name, value in feeds[0].items()
                      if not next(spec for spec in specs if spec.name == name).has_default})
    return feeds
