"""cnnc's passes, one per module, and their registry: a dict of lazy loaders (xDSL's `get_all_passes()`).

Installed as `cnnc.passes` (pyproject maps it from the top-level `passes/` folder). Importing this package loads
no pass: `PASSES` maps each name to a function that imports the pass's module and returns its class, so a spec
loads only the passes it names and one pass module never needs another. The loaders import `cnnc.passes.<module>`
by its full name, so a second copy of a module imported under another name (plain `passes.fold_bn` from a
checkout) cannot shadow a pass, and one dict cannot hold a name twice.

The imports inside the loaders are lazy loading by design (the xDSL pattern), not a way around an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable

from cnnc.pipeline import options
from cnnc.pipeline.contract import Pass
from cnnc.pipeline.order import OrderConstraint


def _simplify():
    from cnnc.passes.simplify import Simplify
    return Simplify


def _fold_bn():
    from cnnc.passes.fold_bn import FoldBatchNorm
    return FoldBatchNorm


def _remove_skip():
    from cnnc.passes.remove_skip import RemoveSkip
    return RemoveSkip


def _remove_skip_approx():
    from cnnc.passes.remove_skip import RemoveSkipApprox
    return RemoveSkipApprox


def _collapse():
    from cnnc.passes.collapse import Collapse
    return Collapse


def _destride():
    from cnnc.passes.destride import Destride
    return Destride


def _drop_blocks():
    from cnnc.passes.drop_blocks import DropBlocks
    return DropBlocks


def _schedule():
    from cnnc.passes.schedule import Schedule
    return Schedule


def _canonicalize():
    from cnnc.pipeline.housekeeping import Canonicalize
    return Canonicalize


def _tidy():
    from cnnc.pipeline.housekeeping import Tidy
    return Tidy


def _refresh_shapes():
    from cnnc.pipeline.housekeeping import RefreshShapes
    return RefreshShapes


def _check_model():
    from cnnc.pipeline.housekeeping import CheckModel
    return CheckModel


PASSES: dict[str, Callable[[], type[Pass]]] = {
    "simplify": _simplify,
    "fold-bn": _fold_bn,
    "remove-skip": _remove_skip,
    "remove-skip-approx": _remove_skip_approx,
    "collapse": _collapse,
    "destride": _destride,
    "drop-blocks": _drop_blocks,
    "schedule": _schedule,
    # The manager runs these itself (cnnc.pipeline.housekeeping); by name they can also be put in a pipeline.
    "canonicalize": _canonicalize,
    "tidy": _tidy,
    "refresh-shapes": _refresh_shapes,
    "check-model": _check_model,
}

# What `cnnc compile` runs when no --passes are given: the exact passes that do not trade speed for size, after
# a general simplification by a library (onnxslim), so that cnnc's passes see the graph the tools users have leave.
DEFAULT_PIPELINE: tuple[str, ...] = ("simplify", "fold-bn", "remove-skip", "collapse", "schedule")

_REWRITING = ("fold-bn", "remove-skip", "remove-skip-approx", "collapse", "destride", "drop-blocks")
_SKIP_BY_PATTERN = ("remove-skip recognises a zero skip weight as a Mul by a constant 0 feeding an Add; collapse "
                    "merges that Mul and Add into a Conv or Gemm, after which the skip and the shortcut that fed "
                    "only it can no longer be removed")
ORDER_CONSTRAINTS: tuple[OrderConstraint, ...] = (
    *(OrderConstraint("simplify", name, "simplify hands the whole graph to a library that knows nothing of cnnc's "
                      "rewrites; run first, it clears the exporter's shape sub-graphs, Reshape/Transpose chains and "
                      "casts before cnnc's passes look for their patterns, and it cannot re-order what schedule chose")
      for name in (*_REWRITING, "schedule")),
    OrderConstraint("fold-bn", "collapse", "fold-bn folds each BatchNormalization in closed form; collapse "
                    "would have to prove a merged Conv or Gemm for every Conv+BN pair by float64 autograd"),
    OrderConstraint("remove-skip", "collapse", _SKIP_BY_PATTERN),
    OrderConstraint("remove-skip-approx", "collapse", _SKIP_BY_PATTERN),
    OrderConstraint("drop-blocks", "collapse", "drop-blocks finds residual blocks by their Add of a skip and a "
                    "branch; collapse merges linear branches and identity skips into one Conv, so the block is gone"),
    OrderConstraint("collapse", "destride", "destride turns strided convs into SpaceToDepth + stride-1 conv; "
                    "collapse cannot merge across that data movement, so linear machines collapse first"),
    *(OrderConstraint(name, "schedule", "schedule fuses sibling Convs/Gemms behind a Split and picks the final "
                      "node order; a later rewrite works on the fused ops and may lose that order")
      for name in _REWRITING),
)


def get_all_passes() -> dict[str, Callable[[], type[Pass]]]:
    """Every pass name with the loader of its class (nothing is imported until a loader is called)."""
    return dict(PASSES)


def get_pass(name: str) -> type[Pass]:
    """The class of pass `name`; an unknown name raises UsageError listing the known ones."""
    return options.pass_class(name, PASSES)


def all_pass_classes() -> dict[str, type[Pass]]:
    """Every pass class by name, loaded (for listings: `cnnc passes`, the fuzzer)."""
    return {name: load() for name, load in PASSES.items()}


def parse_pipeline(text: str | list | tuple) -> list[Pass]:
    """`'fold-bn,destride{mode=network}'` (or a list of names, specs and Pass objects) into pass instances."""
    return options.parse_pipeline(text, PASSES)


__all__ = [
    "DEFAULT_PIPELINE",
    "ORDER_CONSTRAINTS",
    "PASSES",
    "all_pass_classes",
    "get_all_passes",
    "get_pass",
    "parse_pipeline",
]
