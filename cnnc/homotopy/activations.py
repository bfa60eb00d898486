"""Activation homotopy: train activations into identities, so that the convs around them collapse into one.

Each wrapped activation σ (a *site*) computes

    σ_t(x) = t·σ(x) + (1 − t)·x,

with t a non-trainable buffer (shared by every site, or one per site). t = 1 is the network as written; t = 0 is the
identity, and the site then returns x itself: the ONNX export at t = 0 has no op at all where the activation was (no
Mul by zero), so conv → BN → conv is one linear chain that `fold-bn` and `collapse` turn into one conv. The
nonlinearities recognised are ReLU, ReLU6, LeakyReLU, GELU, SiLU and Hardswish, as modules (torchvision and timm use
these) or as functional calls (`F.relu`, `torch.relu`, `x.relu()`, `F.relu6`, `F.leaky_relu`, `F.gelu`, `F.silu`,
`F.hardswish`).

Where sites are found: as the skip homotopy finds joins (`cnnc.homotopy.wrap`): the model is traced with torch.fx,
homotopy joins and sites kept opaque, and each activation call becomes its own site (torchvision's BasicBlock calls
one `self.relu` twice: two sites). A model that does not trace is searched child by child; in an untraceable
module an activation *module* child becomes one site shared by all its calls. Site names are the fx node names with
the path of the traced module in front (`layers.0.relu_1`): stable for one model definition.

Pad-once chains (`cnnc.homotopy.pad_once`): a wrapped site inside conv(k1, p1) → BN → σ → conv(k2, p2) would leave an
inner zero padding at t = 0, and a chain that pads inside is not a conv at its border. `wrap(pad_once=True)` moves
the padding to the first conv of each run of wrapped links, so that at t = 0 the chain is exactly one conv.

Composition with `SkipHomotopy`: wrap the skips first, then the activations of `skip.model` (or the other way
round); both handles drive the same modules, and `HomotopyCallback` takes both with one schedule or one each.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from cnnc.homotopy.join import HomotopyJoin, assign_t, common_t
from cnnc.homotopy.pad_once import ChainLink, PadChange, find_links, pad_once
from cnnc.io.frontend import from_torch

ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish)


def _module_for_function(target, args: tuple, kwargs: dict) -> nn.Module | None:
    """The activation module equal to a functional call (extra arguments read from the fx node), or None."""
    extra = list(args[1:])

    def argument(name: str, position: int, default):
        return kwargs.get(name, extra[position] if position < len(extra) else default)

    if target in (F.relu, torch.relu):
        return nn.ReLU()
    if target is F.relu6:
        return nn.ReLU6()
    if target is F.leaky_relu:
        return nn.LeakyReLU(float(argument("negative_slope", 0, 0.01)))
    if target is F.gelu:
        return nn.GELU(approximate=str(kwargs.get("approximate", "none")))
    if target is F.silu:
        return nn.SiLU()
    if target is F.hardswish:
        return nn.Hardswish()
    return None


def activation_module(node: fx.Node, root: nn.Module) -> nn.Module | None:
    """A fresh, not in-place activation module that computes what `node` computes; None if it is no activation."""
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        if not isinstance(module, ACTIVATION_MODULES):
            return None
        return activation_module_copy(module)
    if node.op == "call_method" and node.target in ("relu", "relu_") and not node.kwargs:
        return nn.ReLU()
    if node.op == "call_function":
        try:
            return _module_for_function(node.target, node.args, dict(node.kwargs))
        except TypeError:  # an unhashable or odd callable: not one of ours
            return None
    return None


class ActivationSite(nn.Module):
    """t·σ(x) + (1 − t)·x with t a buffer; exactly σ at t = 1 and exactly x (no op) at t = 0."""

    def __init__(self, activation: nn.Module, t: float | torch.Tensor = 1.0):
        super().__init__()
        self.activation = activation
        self.register_buffer("t", t if isinstance(t, torch.Tensor) else torch.tensor(float(t)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A Python branch on purpose: the exporter traces it with t's value, so t = 0 exports as nothing.
        t = float(self.t)
        if t == 1.0:
            return self.activation(x)
        if t == 0.0:
            return x
        return self.t * self.activation(x) + (1 - self.t) * x

    def extra_repr(self) -> str:
        return f"t={float(self.t):g}"


class _SiteTracer(fx.Tracer):
    """Keeps sites and skip joins opaque: a second wrap never wraps them again, and both homotopies compose."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (ActivationSite, HomotopyJoin)) or super().is_leaf_module(module, qualified_name)


def trace_model(module: nn.Module) -> fx.GraphModule | None:
    """`module` traced with sites and joins opaque, or None when it does not trace."""
    try:
        graph = _SiteTracer().trace(module)
    except Exception:  # noqa: BLE001 - fx raises many types for untraceable Python (data-dependent control flow)
        return None
    return fx.GraphModule(module, graph, class_name=type(module).__name__)


def is_site_node(node: fx.Node, root: nn.Module) -> bool:
    return node.op == "call_module" and isinstance(root.get_submodule(node.target), ActivationSite)


@dataclass
class _WrapContext:
    t: float
    shared: torch.Tensor | None
    wanted: set[str] | None
    pad_once: bool
    sites: dict[str, ActivationSite] = field(default_factory=dict)
    links: list[ChainLink] = field(default_factory=list)
    pad_changes: list[PadChange] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)  # every activation found, wrapped or not

    def new_site(self, name: str, activation: nn.Module) -> ActivationSite:
        site = ActivationSite(activation, self.shared if self.shared is not None else torch.tensor(self.t))
        self.sites[name] = site
        return site

    def take(self, name: str) -> bool:
        self.seen.add(name)
        return self.wanted is None or name in self.wanted


def _wrap_traced(traced: fx.GraphModule, prefix: str, context: _WrapContext) -> fx.GraphModule:
    changed = False
    for node in list(traced.graph.nodes):
        activation = activation_module(node, traced)
        if activation is None or not context.take(f"{prefix}{node.name}"):
            continue
        attribute = f"activation_site_{node.name}"
        traced.add_submodule(attribute, context.new_site(f"{prefix}{node.name}", activation))
        with traced.graph.inserting_after(node):
            replacement = traced.graph.call_module(attribute, (node.args[0],))
        node.replace_all_uses_with(replacement)
        traced.graph.erase_node(node)
        changed = True
    if not changed:
        return traced
    traced.graph.lint()
    traced.recompile()
    if context.pad_once:
        links, refused = find_links(traced, lambda n: is_site_node(n, traced))
        names = {id(site): name for name, site in context.sites.items()}
        for link in links:
            link.site = names[id(traced.get_submodule(link.site_node.target))]
        context.links.extend(links)
        context.skipped.extend((f"{prefix}{where}", why) for where, why in refused)
        context.pad_changes.extend(pad_once(traced, links, prefix))
    return traced


def _wrap(module: nn.Module, prefix: str, context: _WrapContext) -> nn.Module:
    if isinstance(module, (ActivationSite, HomotopyJoin)):
        return module
    traced = trace_model(module)
    if traced is not None:
        return _wrap_traced(traced, prefix, context)
    why = "does not trace with torch.fx: searched child by child, an activation module shared by all its calls"
    context.skipped.append((prefix or "model", why + ", no pad-once"))
    for name, child in list(module.named_children()):
        if isinstance(child, ACTIVATION_MODULES):
            if context.take(f"{prefix}{name}"):
                setattr(module, name, context.new_site(f"{prefix}{name}", activation_module_copy(child)))
            continue
        new_child = _wrap(child, f"{prefix}{name}.", context)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def activation_module_copy(module: nn.Module) -> nn.Module:
    """A copy that is not in place: the site keeps x, which an in-place activation would overwrite."""
    module = copy.copy(module)
    if hasattr(module, "inplace"):
        module.inplace = False
    return module


@dataclass
class ActivationHomotopy:
    """A model whose chosen activations are t·σ + (1 − t)·id, and the handles to set t and export."""

    model: nn.Module
    site_modules: dict[str, ActivationSite]
    shared: bool
    links: list[ChainLink] = field(default_factory=list)
    pad_changes: list[PadChange] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def wrap(cls, model: nn.Module, sites: Sequence[str] | None = None, t: float = 1.0, shared: bool = True,
             pad_once: bool = True) -> ActivationHomotopy:
        """Wrap the activations of `model` (all, or the named `sites`) as homotopy sites at `t`.

        As with `SkipHomotopy`, train `homotopy.model`: a new GraphModule sharing the parameters when the model
        traces. `pad_once=True` rewrites the paddings of the convs around wrapped chain sites (in place: the conv
        modules are shared with `model`); see `cnnc.homotopy.pad_once`. Unknown site names raise KeyError.
        """
        if not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"t = {t} is outside [0, 1]")
        wanted = None if sites is None else set(sites)
        context = _WrapContext(float(t), torch.tensor(float(t)) if shared else None, wanted, pad_once)
        wrapped = _wrap(model, "", context)
        if wanted is not None and wanted - context.seen:
            raise KeyError(f"no such activation sites: {', '.join(sorted(wanted - context.seen))} "
                           f"(found: {', '.join(sorted(context.seen)) or 'none'})")
        return cls(wrapped, context.sites, shared, context.links, context.pad_changes, context.skipped)

    @property
    def sites(self) -> list[str]:
        return list(self.site_modules)

    @property
    def t(self) -> float | dict[str, float]:
        return common_t(self.t_per_site())

    def t_per_site(self) -> dict[str, float]:
        return {name: float(site.t) for name, site in self.site_modules.items()}

    def set_t(self, value: float | Mapping[str, float]) -> None:
        """Set t for every site (a float) or for the named sites (a mapping; per-site t needs shared=False)."""
        assign_t(self.site_modules, value, self.shared, "site", "activation sites")

    def export(self, example_input, t: float | None = 0.0, dynamic_batch: bool = True):
        """The model as ONNX through cnnc's torch frontend at activation weight `t` (None: as it is now); the
        previous t is restored. At t = 0 the wrapped activations are gone from the graph. Set a composed
        `SkipHomotopy` to its own t first (its `export` does the same for the skips only)."""
        previous = self.t_per_site()
        try:
            if t is not None:
                self.set_t(t)
            return from_torch(self.model, example_input, dynamic_batch=dynamic_batch)
        finally:
            self.set_t(previous)
