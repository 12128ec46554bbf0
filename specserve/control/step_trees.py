"""One step's drafted trees as flat arrays: valued, ranked and cut for the whole batch at once.

The controller prices every drafted node of an iteration and keeps each request's best; done
tree by tree in Python that costs tens of microseconds per request, which at tens of concurrent
requests approaches a percent of a GPU iteration. Here each step is a few array operations
(one per tree level for the calibration), plus building the trees that were cut.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain

import numpy as np

from specserve.control.selection import RankedNodes, node_layout
from specserve.spec.tree import TokenTree


class StepTrees:
    """The drafted trees of one step, one row per node (request 0's nodes, then request 1's, ...)."""

    def __init__(self, trees: list[TokenTree], scales: Callable[[int], list[float]]) -> None:
        """``scales(max_depth)``: the predictor's calibration for depths 0 .. ``max_depth``."""
        self.trees = trees
        sizes = np.fromiter(map(len, trees), dtype=np.int64, count=len(trees))
        total = int(sizes.sum())

        def flat(field: str, dtype: type) -> np.ndarray:
            return np.fromiter(chain.from_iterable(getattr(t, field) for t in trees), dtype=dtype, count=total)

        self.path_probs = flat("path_probs", float)
        self.depths = flat("depths", np.int64)
        self.request, self.first = node_layout(sizes)  # ranking keeps each request's nodes in place
        local_parents = flat("parents", np.int64)
        self.parents = np.where(local_parents >= 0, local_parents + self.first, -1)  # flat indices
        self.values = self._calibrated(scales(int(self.depths.max(initial=0))))
        self.by_value = np.lexsort((self.depths, -self.values, self.request))  # stable: index last
        self.ranked = RankedNodes(self.values[self.by_value], sizes, (self.request, self.first))

    def _calibrated(self, scales: list[float]) -> np.ndarray:
        """Every node's path probability times its depth's calibration, never above its
        parent's (``acceptance.calibrated_values`` for all trees at once)."""
        values = np.minimum(self.path_probs * np.asarray(scales)[self.depths], 1.0)
        if all(deeper <= scale for scale, deeper in zip(scales[1:], scales[2:])):
            return values  # path probabilities never grow along a path, so neither do these
        parents = np.where(self.parents >= 0, self.parents, np.arange(len(values)))
        for _ in range(len(scales) - 2):  # after k rounds, each node is capped by k ancestors
            np.minimum(values, values[parents], out=values)
        return values

    def cut(self, counts: np.ndarray) -> list[TokenTree]:
        """Each tree's ``counts`` most valuable nodes (ties: the shallower, then the earlier),
        re-indexed by depth; a tree that keeps all its nodes is returned as it is."""
        counts = np.minimum(counts, self.ranked.sizes)
        keep = np.zeros(len(self.values), dtype=bool)
        keep[self.by_value] = self.ranked.is_within(counts)
        kept = np.lexsort((self.depths, self.request))  # per request by depth; stable: index last
        kept = kept[keep[kept]]
        new_index = np.full(len(self.values), -1)
        kept_first = (np.cumsum(counts) - counts)[self.request[kept]]
        new_index[kept] = np.arange(len(kept)) - kept_first
        parents = np.where(self.parents[kept] >= 0, new_index[self.parents[kept]], -1).tolist()
        local = (kept - self.first[kept]).tolist()
        result, start = [], 0
        for tree, n in zip(self.trees, counts.tolist()):
            if n >= len(tree):
                result.append(tree)
            else:
                nodes = local[start : start + n]
                result.append(TokenTree(
                    tokens=[tree.tokens[i] for i in nodes],
                    parents=parents[start : start + n],
                    probs=[tree.probs[i] for i in nodes],
                    path_probs=[tree.path_probs[i] for i in nodes],  # every ancestor came along
                    depths=[tree.depths[i] for i in nodes],
                    num_candidates=len(tree),
                ))
            start += n
        return result
