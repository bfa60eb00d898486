"""The drawing behind `cnnc inspect --schedule --plot`: a model's hypergraph by level (seed 002).

Level widths as bars; for graphs of at most PLOT_TENSOR_LIMIT tensors also the hypergraph itself, tensors as dots
placed by depth, each op as lines from its inputs to its outputs, the critical path in red. matplotlib is optional
and imported only here, when a plot is drawn.
"""

from __future__ import annotations

import itertools

from cnnc.linear.hypergraph import Hypergraph

# Above this many tensors the drawing of the hypergraph is unreadable; the plot then shows only the level widths.
PLOT_TENSOR_LIMIT = 150


def _critical_links(view: Hypergraph) -> set[tuple[str, str]]:
    """(tensor, tensor) pairs along the critical path: the chain of tensors that joins its ops."""
    path = view.critical_path()
    if not path:
        return set()
    chain = [view.edges[path[-1]].outputs[0]] if view.edges[path[-1]].outputs else []
    for earlier, later in zip(path[-2::-1], path[:0:-1]):
        chain.append(next(s for s in view.edges[earlier].outputs if s in view.edges[later].inputs))
    first = view.edges[path[0]]
    chain += [s for s in first.inputs if view.depth().get(s, 0) == 0][:1]
    chain.reverse()
    return set(itertools.pairwise(chain))


def plot_levels(view: Hypergraph, path: str) -> None:
    """Level widths as bars; for small graphs also the hypergraph drawn by level (tensors as dots, ops as lines
    from each input to each output, the critical path in red)."""
    import matplotlib  # optional (the `plot` extra): `cnnc.cli.outputs` checks for it before drawing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional, as above
    levels = view.levels()
    small = len(view.spaces) <= PLOT_TENSOR_LIMIT
    figure, axes = plt.subplots(2 if small else 1, 1, figsize=(min(40, max(7, 0.35 * len(levels))), 8 if small else 3),
                                squeeze=False, gridspec_kw={"height_ratios": [1, 3]} if small else None)
    bars = axes[0][0]
    bars.bar([lv.depth for lv in levels], [lv.width for lv in levels], color="#4477aa")
    bars.set_xlabel("depth (longest path from the inputs)")
    bars.set_ylabel("width (tensors)")
    bars.set_title("levels of the hypergraph")
    if small:
        drawing = axes[1][0]
        position, critical = {}, _critical_links(view)
        for level in levels:
            for row, space in enumerate(level.tensors):
                position[space] = (level.depth, row - (level.width - 1) / 2)
        for edge in view.edges:
            for source in edge.inputs:
                for target in edge.outputs:
                    (x0, y0), (x1, y1) = position[source], position[target]
                    red = (source, target) in critical
                    drawing.plot([x0, x1], [y0, y1], color="#cc3311" if red else "#999999",
                                 linewidth=1.6 if red else 0.8, zorder=1 + red)
        xs, ys = zip(*position.values()) if position else ((), ())
        drawing.scatter(xs, ys, s=18, color="#222222", zorder=3)
        if len(view.spaces) <= 40:
            for space, (x, y) in position.items():
                drawing.annotate(space, (x, y), fontsize=6, xytext=(2, 3), textcoords="offset points")
        drawing.set_xlabel("depth")
        drawing.set_yticks([])
        drawing.set_title("tensors by level, ops as input-output lines, critical path red", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
