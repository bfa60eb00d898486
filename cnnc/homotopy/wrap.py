"""Wrapping a torch model's residual joins as homotopy joins, and `SkipHomotopy`, the handle to set t and export.

Where joins are found:
- a cnnc `Residual(branch, shortcut)` module: its join is replaced in place;
- any torch.fx-traceable model or sub-module: the adds that `cnnc.homotopy.fx_joins.find_joins` classifies as
  residual joins (identity skip, or a linear projection skip that is the shorter path; the rule shared with
  `cnnc analyze`). torchvision's BasicBlock and Bottleneck (`out += identity`, with an optional `downsample`) are
  of this shape. Two branches of equal length, or a skip through a nonlinearity, are left alone with the reason;
- a model that does not trace as a whole is searched child by child, each traceable child traced on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from cnnc.homotopy.activations import ActivationSite
from cnnc.homotopy.fx_joins import find_joins
from cnnc.homotopy.join import HomotopyJoin, Residual, assign_t, common_t
from cnnc.io.frontend import from_torch


class _JoinTracer(fx.Tracer):
    """Keeps homotopy joins, cnnc Residual blocks and activation sites opaque, so that a second wrap never wraps
    them again and both homotopies compose."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (HomotopyJoin, Residual, ActivationSite)) or super().is_leaf_module(
            module, qualified_name)



@dataclass
class _WrapContext:
    t: float
    shared: torch.Tensor | None
    joins: dict[str, HomotopyJoin] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    done: set[int] = field(default_factory=set)  # id() of the Residual blocks already wrapped

    def new_join(self, name: str) -> HomotopyJoin:
        join = HomotopyJoin(self.shared if self.shared is not None else torch.tensor(float(self.t)))
        self.joins[name] = join
        return join


def _wrap_traced(module: nn.Module, prefix: str, context: _WrapContext, example_input) -> nn.Module | None:
    """fx-trace `module` and replace its residual adds by joins: the new GraphModule, `module` itself when it traced
    but has no residual add, or None when it does not trace."""
    try:
        graph = _JoinTracer().trace(module)
    except Exception:  # noqa: BLE001 — fx raises many types for untraceable Python (data-dependent control flow, ...)
        return None
    traced = fx.GraphModule(module, graph, class_name=type(module).__name__)
    if example_input is not None:
        # In eval mode: a training-mode forward would move the BatchNorm running statistics towards the example.
        modes = [(m, m.training) for m in traced.modules()]
        traced.eval()
        try:
            with torch.no_grad():
                ShapeProp(traced).propagate(*example_input)
        except Exception as error:  # noqa: BLE001 — shapes only refine the test; the structural test still applies without them
            why = f"shape propagation failed ({type(error).__name__}: {error}); operand shapes were not compared"
            context.skipped.append((prefix or "model", why))
        finally:
            for m, training in modes:
                m.training = training
    matches, not_taken = find_joins(traced.graph)
    context.skipped.extend((f"{prefix}{where}", why) for where, why in not_taken)
    if not matches:
        return module
    for index, match in enumerate(matches):
        name = f"homotopy_join_{index}"
        while hasattr(traced, name):
            name += "_"
        traced.add_submodule(name, context.new_join(f"{prefix}{name}"))
        with traced.graph.inserting_after(match.node):
            replacement = traced.graph.call_module(name, (match.branch, match.skip))
        match.node.replace_all_uses_with(replacement)
        traced.graph.erase_node(match.node)
    traced.graph.lint()
    traced.recompile()
    return traced


def _residuals(module: nn.Module, prefix: str = ""):
    """The Residual blocks under `module`, not descending into Residual blocks (those wrap their own insides)."""
    for name, child in module.named_children():
        if isinstance(child, Residual):
            yield f"{prefix}{name}", child
        else:
            yield from _residuals(child, f"{prefix}{name}.")


def _wrap_residual(residual: Residual, prefix: str, context: _WrapContext) -> None:
    if id(residual) in context.done:
        return
    context.done.add(id(residual))
    if residual.join is None:
        residual.join = context.new_join(f"{prefix}join")
    residual.branch = _wrap(residual.branch, f"{prefix}branch.", context, None)
    residual.shortcut = _wrap(residual.shortcut, f"{prefix}shortcut.", context, None)


def _wrap(module: nn.Module, prefix: str, context: _WrapContext, example_input) -> nn.Module:
    """Wrap the joins of `module`; returns it (changed in place) or a new GraphModule that replaces it."""
    if isinstance(module, HomotopyJoin):
        return module
    if isinstance(module, Residual):
        _wrap_residual(module, prefix, context)
        return module
    # Explicit Residual blocks first, in place: the tracer keeps them opaque, so this is where their insides are seen.
    for name, residual in list(_residuals(module)):
        _wrap_residual(residual, f"{prefix}{name}.", context)
    traced = _wrap_traced(module, prefix, context, example_input)
    if traced is not None:  # it traced: every add outside the opaque blocks was seen
        return traced
    for name, child in list(module.named_children()):
        if isinstance(child, (Residual, HomotopyJoin)):
            continue
        new_child = _wrap(child, f"{prefix}{name}.", context, None)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


# ------------------------------------------------------------------------------------------- control and export


@dataclass
class SkipHomotopy:
    """A model whose residual joins are (1 − t)·F + t·S, and the handles to set and read t."""

    model: nn.Module
    joins: dict[str, HomotopyJoin]
    shared: bool
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def wrap(cls, model: nn.Module, t: float = 0.5, shared: bool = True, example_input=None) -> SkipHomotopy:
        """Replace the residual joins of `model` by homotopy joins at skip weight `t`.

        `model` is changed in place where its joins are explicit (Residual) or inside children that had to be traced
        on their own; when the whole model traces, `homotopy.model` is a new GraphModule sharing its parameters, so
        train `homotopy.model`. `example_input` (a tensor or tuple) lets tracing check that both operands of an add
        have one shape. `shared=False` gives every join its own t.
        """
        if example_input is not None and not isinstance(example_input, (tuple, list)):
            example_input = (example_input,)
        if not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"t = {t} is outside [0, 1]")
        context = _WrapContext(float(t), torch.tensor(float(t)) if shared else None)
        wrapped = _wrap(model, "", context, example_input)
        return cls(wrapped, context.joins, shared, context.skipped)

    @property
    def t(self) -> float | dict[str, float]:
        """The skip weight: one float when shared (or when every join has the same), else one per join."""
        return common_t(self.t_per_join())

    def t_per_join(self) -> dict[str, float]:
        return {name: float(join.t) for name, join in self.joins.items()}

    def set_t(self, value: float | Mapping[str, float]) -> None:
        """Set t for every join (a float) or for the named joins (a mapping, per-join t only)."""
        assign_t(self.joins, value, self.shared, "join", "joins")

    def export(self, example_input, t: float | None = 0.0, dynamic_batch: bool = True):
        """The model as ONNX through cnnc's torch frontend, with t baked in as constants (t=None: as it is now).

        The previous t is restored afterwards. At t = 0 every join reads Mul(S, 0): `remove-skip` deletes it.
        """
        previous = self.t_per_join()
        try:
            if t is not None:
                self.set_t(t)
            return from_torch(self.model, example_input, dynamic_batch=dynamic_batch)
        finally:
            self.set_t(previous)
