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

Through a join. After a residual block the activation reads the join, conv_b2 → BN → join(branch, skip) → σ → conv,
and at t = 0 the join is its branch (`HomotopyJoin`: (1 − t)·branch + t·skip), so the link runs through it (the
branch read once, the join read once). Its output then carries the branch conv's border e_j, and the skip operand is
fitted to it: a skip with border e_s (a site output of a run) is cropped by e_s − e_j, one with none (e_s = 0) is
zero-padded by e_j. Both only shape what training sees: at t = 0 the skip is multiplied by 0 and `remove-skip`
deletes it with its crop or pad. A projected shortcut (a downsampling 1×1 conv + BN, which remove-skip deletes
too) reads a bordered map whose own border depends on the map size and stride: it is centre-cropped (or padded) to
the branch's size at run time (`fit_to`), aligned to within a pixel; again only training sees it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import fx, nn

from cnnc.homotopy.join import HomotopyJoin

_BEFORE_SITE = (nn.BatchNorm2d, nn.Identity, nn.Dropout, nn.Dropout2d)
_AFTER_SITE = (nn.Identity, nn.Dropout, nn.Dropout2d)
_PROJECTION = (nn.Conv2d, nn.BatchNorm2d, nn.Identity)  # a shortcut projection: downsample conv + BN


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
    # joins between conv `before` and the site, read through their branch (module docstring: through a join)
    joins: list[fx.Node] = field(default_factory=list, repr=False, compare=False)

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


def _skip_read(root: nn.Module, user: fx.Node, value: fx.Node) -> fx.Node | None:
    """The homotopy join whose shortcut is all that `user` reads `value` for, or None. The shortcut is `value` itself
    or a projection of it (conv, BN, Identity, each read once, as a downsampling shortcut is): gone at t = 0."""
    while isinstance(_module(root, user), _PROJECTION) and user.args == (value,) and not user.kwargs \
            and len(user.users) == 1:
        value, user = user, next(iter(user.users))
    if isinstance(_module(root, user), HomotopyJoin) and len(user.args) == 2 and user.args[1] is value \
            and user.args[0] is not value and not user.kwargs:
        return user
    return None


def crop_border(x, border: tuple[int, int]):
    """The centre of `x` without `border` pixels on each side of its two spatial axes (static slices); a negative
    border adds that many zero pixels instead (a skip fitted to a padded branch: module docstring)."""
    grow = [max(-b, 0) for b in border]
    if any(grow):
        x = F.pad(x, (grow[1], grow[1], grow[0], grow[0]))
    crop = [max(b, 0) for b in border]
    return x[..., crop[0]:(-crop[0] or None), crop[1]:(-crop[1] or None)]


def fit_to(x, like):
    """`x` centre-cropped or zero-padded to the spatial size of `like` (sizes read as Python ints: an export traces
    static slices). Used on a projected shortcut, which only training reads (module docstring)."""
    border = [(int(x.shape[a]) - int(like.shape[a])) for a in (-2, -1)]
    grow = [max(-b, 0) for b in border]
    if any(grow):
        x = F.pad(x, (grow[1] // 2, grow[1] - grow[1] // 2, grow[0] // 2, grow[0] - grow[0] // 2))
    crop = [max(b, 0) for b in border]
    return x[..., crop[0] // 2:int(x.shape[-2]) - (crop[0] - crop[0] // 2),
             crop[1] // 2:int(x.shape[-1]) - (crop[1] - crop[1] // 2)]


def _branch_join(root: nn.Module, node: fx.Node) -> bool:
    """`node` is a homotopy join forward(branch, skip) whose branch is another value (at t = 0 it is the branch)."""
    return isinstance(_module(root, node), HomotopyJoin) and len(node.args) == 2 and not node.kwargs \
        and all(isinstance(a, fx.Node) for a in node.args) and node.args[0] is not node.args[1]


def _link(root: nn.Module, site: fx.Node, calls: dict[str, int]) -> tuple[ChainLink | None, str]:
    between, joins = [], []
    node = site.args[0] if site.args and isinstance(site.args[0], fx.Node) else None
    while node is not None and (isinstance(_module(root, node), _BEFORE_SITE) or _branch_join(root, node)):
        if len(node.users) != 1:
            return None, f"{node.target} is read {len(node.users)} times"
        between.insert(0, node.target)
        if _branch_join(root, node):
            joins.insert(0, node)
        node = node.args[0] if isinstance(node.args[0], fx.Node) else None
    if node is None or not isinstance(_module(root, node), nn.Conv2d):
        return None, "its input is not a conv (through BN, Identity, Dropout only)"
    before = node
    if len(before.users) != 1:
        return None, f"conv {before.target}'s output is read {len(before.users)} times"
    node, skip_reads = site, []
    while True:
        reads = {user: _skip_read(root, user, node) for user in node.users}
        users = [user for user, join in reads.items() if join is None]
        skip_reads += [(node, join) for join in reads.values() if join is not None]
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
    return ChainLink(before.target, node.target, site.name, between, site_node=site, skip_reads=skip_reads,
                     joins=joins), ""


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
    changes = []
    value_border: dict[fx.Node, tuple[int, int]] = {}  # a site output read by a skip -> its border
    join_border: dict[fx.Node, tuple[int, int]] = {}  # a join inside a run -> the border of its output
    for run in runs(links):
        names = [run[0].before] + [link.after for link in run]
        convs = [traced.get_submodule(name) for name in names]
        for link, border in zip(run, run_borders(convs)):  # link j's site reads conv_j's output
            value_border.update((value, border) for value, _ in link.skip_reads)
            join_border.update((join, border) for join in link.joins)
        for name, conv, new in zip(names, convs, run_paddings(convs)):
            old = conv_padding(conv)
            if old != new:
                conv.padding = new
                changes.append(PadChange(prefix + name, old, new))
        for link in run:
            link.prefix = prefix
    joins = list(dict.fromkeys([*join_border, *(j for link in links for _, j in link.skip_reads)]))
    fitted = False
    projected = {join for link in links for value, join in link.skip_reads if join.args[1] is not value}
    for join in joins:  # fit each skip operand to the border its join's output carries
        branch, skip = join.args
        own, wanted = value_border.get(skip, (0, 0)), join_border.get(join, (0, 0))
        border = tuple(own[a] - wanted[a] for a in range(2))
        if join in projected:  # a projection's border depends on the map size: fit it to the branch's
            with traced.graph.inserting_before(join):
                fit = traced.graph.call_function(fit_to, (skip, branch))
        elif any(border):
            with traced.graph.inserting_before(join):
                fit = traced.graph.call_function(crop_border, (skip, border))
        else:
            continue
        join.replace_input_with(skip, fit)
        fitted = True
    if fitted:
        traced.graph.lint()
        traced.recompile()
    return changes
