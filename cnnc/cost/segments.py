"""The cheapest segmentation of a chain into merged segments: one dynamic programme for `collapse` and `plan`.

A chain is items 0..n−1 (convs, in order). A *segment* i..j (i < j) is items i..j replaced by one merged item; item
j alone (i = j) is kept as it is. `cost(i, j)` gives the cost of that form (estimated seconds), or None when it is
not allowed (the merge loses by the cost model, is not exact, or was not measured faster); `cost(j, j)` must never
be None, so the chain kept whole is always a solution.

A segmentation using m merged *links* (m = Σ (j − i) over merged segments: each merged segment i..j removes j − i
boundaries) costs the sum of its segments. LayerMerge's DP over the last segment:

    best[0] = {0: 0},    best[j + 1][m] = min over i ≤ j of  best[i][m − (j − i)] + cost(i, j)

costs O(n²) calls of `cost` and O(n³) table updates; n is a chain's length (a few tens of convs at most). Ties keep
the first form found, which is the kept item (i = j) and then the longest segment, so that a merge is taken only
when it is strictly cheaper.
"""

from __future__ import annotations

from collections.abc import Callable

Segmentation = tuple[float, list[tuple[int, int]]]  # (total cost, merged segments (i, j) with i < j, in order)


def best_segmentations(n: int, cost: Callable[[int, int], float | None]) -> dict[int, Segmentation]:
    """Links merged -> the cheapest segmentation of items 0..n−1 using exactly that many (module docstring)."""
    best: list[dict[int, Segmentation]] = [{0: (0.0, [])}]  # best[j]: items 0..j−1 placed
    for j in range(n):
        table: dict[int, Segmentation] = {}
        for i in range(j, -1, -1):  # i = j first: on equal cost the kept item wins
            value = cost(i, j)
            if value is None:
                if i == j:
                    raise ValueError(f"item {j} has no cost kept as it is")
                continue
            merged = [(i, j)] if i < j else []
            for m, (before, segments) in best[i].items():
                total = before + value
                key = m + j - i
                if key not in table or total < table[key][0]:
                    table[key] = (total, segments + merged)
        best.append(table)
    return best[n]


def cheapest_segmentation(n: int, cost: Callable[[int, int], float | None]) -> Segmentation:
    """The cheapest segmentation whatever the number of merged links (fewest links on ties)."""
    options = best_segmentations(n, cost)
    return options[min(options, key=lambda m: (options[m][0], m))]
