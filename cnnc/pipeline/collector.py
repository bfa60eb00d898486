"""Python's cyclic garbage collector during the compile of a large graph.

A graphsurgeon graph is millions of small objects in reference cycles (a tensor lists its readers, each reader its
tensors). CPython runs a full collection, which traverses every tracked object, whenever the objects that survived
younger collections grow by a quarter of the old ones; while a 100k-node graph is imported, rewritten and exported
that happens about twenty times, ~9 s of a 37 s compile (bench/scale.py). The objects are alive for the whole
compile, so those collections free almost nothing of them.

`deferred_full_collections(nodes)` sets, for graphs above `LARGE_GRAPH_NODES` nodes, the third collection threshold
so high that no full collection starts on its own, and restores the thresholds afterwards. Young collections still
run, so short-lived cycles (a trial copy, a replaced node) are still freed as before, and explicit `gc.collect()`
calls (cnnc.api and cnnc.ir free large weights with them) still collect everything. Smaller graphs keep Python's
defaults: their full collections are cheap, and their peak memory stays exactly as it was.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

LARGE_GRAPH_NODES = 20_000  # full collections cost ~1 s each at 100k nodes, tens of ms below this
_NEVER = 1 << 30  # a third threshold no count of young collections reaches


@contextmanager
def deferred_full_collections(nodes: int) -> Iterator[None]:
    """No automatic full collection while the block runs, for a graph of more than LARGE_GRAPH_NODES nodes."""
    if nodes <= LARGE_GRAPH_NODES:
        yield
        return
    thresholds = gc.get_threshold()
    gc.set_threshold(thresholds[0], thresholds[1], _NEVER)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
