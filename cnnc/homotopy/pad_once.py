"""Pad-once chains: move the zero padding of a conv chain to its first conv, so that at t = 0 it is one conv.

A *link* is conv_a → (BN | Identity | Dropout)* → σ → (Identity | Dropout)* → conv_b in a torch.fx graph, every
value in it read once, conv_a and conv_b `nn.Conv2d` modules called once, with zero padding. With σ the identity
the link is linear, but conv_b's zero padding is applied to conv_a's *output*: at the border the chain reads 0 where
one conv would read conv_a's bias and BN shift, so the chain is not a conv (the DBB border bug).

The rewrite, for a run of wrapped links conv_0 → … → conv_m (strides s_j, paddings p_j per spatial axis): inner
convs pad 0, and the first conv pads p_0 + s_0·e_0 with the extra border e_j carried by conv_j's output

    e_m = 0,    e_j = s_(j+1)·e_(j+1) + p_(j+1).

Then every conv output of the run is its old output with e_j more pixels on each side (⌊(n + 2p + 2s·e − k)/s⌋ + 1
= old + 2e exactly), so conv_m's output has its old size. For one link at stride 1 this is conv(k1, p1 + p2) →
conv(k2, 0), the issue's form; at t = 0 the run is one conv of stride Π s_j and kernel k_0 + Σ_j (k_j − 1)·d_j·Π_(i<j) s_i
(a stride-2 first conv: k1 + 2(k2 − 1)), which `fold-bn` + `collapse` compute and prove exactly. This changes the
function at the borders (a different architecture, not an approximation): training adapts to it.

Skip reads. A site whose output is also read as the *shortcut* of a `HomotopyJoin` (the ResNet stem feeding an
identity skip) is still a link: the skip homotopy removes that read at t = 0, so the chain is linear there. During
training the shortcut must keep its old size, so it reads a centre crop of e_j pixels per side: the padded output's
centre is exactly the old output (the extra zero border only adds outer pixels), so the crop changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import fx, nn

from cnnc.homotopy.join import HomotopyJoin

_BEFORE_SITE = (nn.BatchNorm2d, nn.Identity, nn.Dropout, nn.Dropout2d)
_AFTER_SITE = (nn.Identity, nn.Dropout, nn.Dropout2d)


@dataclass
class ChainLink:
    """conv `before` → `between` → the activation site → conv `after` (module paths in the traced module)."""

    before: str
    after: str
    site: str  # the site's name (the caller names it)
    between: list[str] = field(default_factory=list)
    prefix: str = ""  # path of the traced module inside the model
    site_node: fx.Node | None = field(default=None, repr=False, compare=False)
    # (value, join) pairs: skip reads of the site's output that the skip homotopy removes at t = 0 (module docstring)
    skip_reads: list[tuple[fx.Node, fx.Node]] = field(default_factory=list, repr=False, compare=False)

    def as_dict(self) -> dict:
        return {"before": self.prefix + self.before, "site": self.site, "after": self.prefix + self.after,
                "between": [self.prefix + b for b in self.between]}


@dataclass(frozen=True)
class PadChange:
    conv: str
    old: tuple[int, int]
    new: tuple[int, int]


def _module(root: nn.Module, node: fx.Node) -> nn.Module | None:
    return root.get_submodule(node.target) if node.op == "call_module" else None


def conv_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """Symmetric zero padding per spatial axis, or None when it is not that ('same', reflect, ...)."""
    if conv.padding_mode != "zeros" or conv.padding == "same":
        return None
    return (0, 0) if conv.padding == "valid" else tuple(int(p) for p in conv.padding)


def _conv_reason(root: nn.Module, node: fx.Node, calls: dict[str, int]) -> str | None:
    module = _module(root, node)
    if not isinstance(module, nn.Conv2d):
        return f"{node.name} is not an nn.Conv2d module"
    if calls.get(node.target, 0) != 1:
        return f"conv {node.target} is called {calls.get(node.target, 0)} times (its padding is shared)"
    if conv_padding(module) is None:
        return f"conv {node.target} pads with {module.padding_mode!r} / {module.padding!r}, not zeros"
    return None


def _skip_read(root: nn.Module, user: fx.Node, value: fx.Node) -> bool:
    """`user` reads `value` only as the shortcut of a homotopy join (forward(branch, skip)): gone at t = 0."""
    return isinstance(_module(root, user), HomotopyJoin) and len(user.args) == 2 and user.args[1] is value \
        and user.args[0] is not value and not user.kwargs


def crop_border(x, border: tuple[int, int]):
    """The centre of `x` without `border` pixels on each side of its two spatial axes (static slices)."""
    return x[..., border[0]:(-border[0] or None), border[1]:(-border[1] or None)]


def _link(root: nn.Module, site: fx.Node, calls: dict[str, int]) -> tuple[ChainLink | None, str]:
    between = []
    node = site.args[0] if site.args and isinstance(site.args[0], fx.Node) else None
    while node is not None and isinstance(_module(root, node), _BEFORE_SITE):
        if len(node.users) != 1:
            return None, f"{node.target} is read {len(node.users)} times"
        between.insert(0, node.target)
        node = node.args[0] if isinstance(node.args[0], fx.Node) else None
    if node is None or not isinstance(_module(root, node), nn.Conv2d):
        return None, "its input is not a conv (through BN, Identity, Dropout only)"
    before = node
    if len(before.users) != 1:
        return None, f"conv {before.target}'s output is read {len(before.users)} times"
    node, skip_reads = site, []
    while True:
        users = [user for user in node.users if not _skip_read(root, user, node)]
        skip_reads += [(node, user) for user in node.users if user not in users]
        if len(users) != 1:
            return None, f"{node.name}'s output is read {len(users)} times (a branch or an output)"
        node = users[0]
        if not isinstance(_module(root, node), _AFTER_SITE):
            break
        between.append(node.target)
    if not isinstance(_module(root, node), nn.Conv2d):
        return None, f"it feeds {node.name}, not a conv"
    for conv in (before, node):
        why = _conv_reason(root, conv, calls)
        if why is not None:
            return None, why
    return ChainLink(before.target, node.target, site.name, between, site_node=site, skip_reads=skip_reads), ""


def find_links(traced: fx.GraphModule, is_site: Callable[[fx.Node], bool]
               ) -> tuple[list[ChainLink], list[tuple[str, str]]]:
    """The sites of `traced` (those `is_site` accepts) that are conv → σ → conv links, and the others with why."""
    calls: dict[str, int] = {}
    for node in traced.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    links, refused = [], []
    for node in traced.graph.nodes:
        if not is_site(node):
            continue
        link, why = _link(traced, node, calls)
        if link is None:
            refused.append((node.name, f"not a pad-once chain site: {why}"))
        else:
            links.append(link)
    return links, refused


def runs(links: list[ChainLink]) -> list[list[ChainLink]]:
    """Links grouped into maximal runs conv_0 → conv_1 → … (a link's `after` is the next link's `before`)."""
    by_before = {link.before: link for link in links}
    afters = {link.after for link in links}
    result = []
    for link in links:
        if link.before in afters:
            continue  # not the start of a run
        run = [link]
        while run[-1].after in by_before:
            run.append(by_before[run[-1].after])
        result.append(run)
    return result


def run_borders(convs: list[nn.Conv2d]) -> list[tuple[int, int]]:
    """e_j per conv of a run (old paddings): the extra border its output carries after pad-once (module docstring)."""
    borders = [(0, 0)]
    for conv in reversed(convs[1:]):
        padding = conv_padding(conv)
        borders.insert(0, tuple(conv.stride[a] * borders[0][a] + padding[a] for a in range(2)))
    return borders


def run_paddings(convs: list[nn.Conv2d]) -> list[tuple[int, int]]:
    """New paddings of a run's convs: inner convs 0, the first p_0 + s_0·e_0 (module docstring)."""
    extra = run_borders(convs)[0]
    first = conv_padding(convs[0])
    return [tuple(first[a] + convs[0].stride[a] * extra[a] for a in range(2))] + [(0, 0)] * (len(convs) - 1)


def pad_once(traced: fx.GraphModule, links: list[ChainLink], prefix: str = "") -> list[PadChange]:
    """Rewrite the paddings of every run of `links` in place (the conv modules); returns what changed."""
    changes, cropped = [], False
    for run in runs(links):
        names = [run[0].before] + [link.after for link in run]
        convs = [traced.get_submodule(name) for name in names]
        for link, border in zip(run, run_borders(convs)):  # link j's site reads conv_j's output
            for value, join in link.skip_reads if any(border) else ():
                with traced.graph.inserting_before(join):
                    crop = traced.graph.call_function(crop_border, (value, border))
                join.replace_input_with(value, crop)
                cropped = True
        for name, conv, new in zip(names, convs, run_paddings(convs)):
            old = conv_padding(conv)
            if old != new:
                conv.padding = new
                changes.append(PadChange(prefix + name, old, new))
        for link in run:
            link.prefix = prefix
    if cropped:
        traced.graph.lint()
        traced.recompile()
    return changes
