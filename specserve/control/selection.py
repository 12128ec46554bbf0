"""Which drafted nodes the target verifies: SLO floors first, then global value (AdaServe).

Each request offers its drafted nodes as values (calibrated acceptance probabilities) sorted from
best to worst; since values never grow along a path, any prefix of that order is a valid subtree.
A request's expected tokens from verifying its best ``n`` nodes is ``1 + sum(values[:n])`` (the
target always yields one token). Phase 1 gives every request the fewest nodes that lift its
expected tokens to its floor (what it needs to stay on its TPOT SLO), most urgent first; phase 2
spends what is left of the token budget on the best remaining nodes of all requests. Because each
request's gain is concave in its node count, this greedy maximises total expected tokens under
the budget among selections that meet every floor (when the budget allows that).

Serving a floor lengthens the step for everyone, which raises every floor; ``harmless_floors``
picks the floors a step can serve without putting behind a request it would have left on track
(what ``auto`` serves, where AdaServe serves every floor its token budget holds).

Every step's nodes are held flat (``RankedNodes``), so that selection costs a few array
operations for the whole batch rather than Python work per node.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

import numpy as np


def node_layout(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For nodes held request after request, ``sizes`` each: every node's request, and the
    index of its request's first node."""
    request = np.repeat(np.arange(len(sizes)), sizes)
    return request, (np.cumsum(sizes) - sizes)[request]


class RankedNodes:
    """The drafted node values of one step: request 0's best first, then request 1's, ..."""

    def __init__(
        self, values: np.ndarray, sizes: np.ndarray, layout: tuple[np.ndarray, np.ndarray] | None = None
    ) -> None:
        self.values = values  # float [nodes]
        self.sizes = sizes  # int [requests]: nodes per request
        self.request, self.first = node_layout(sizes) if layout is None else layout

    @classmethod
    def of(cls, values: list[list[float]]) -> RankedNodes:
        """From each request's values in any order."""
        ranked = [sorted(v, reverse=True) for v in values]
        flat = np.array([value for v in ranked for value in v], dtype=float)
        return cls(flat, np.array([len(v) for v in ranked], dtype=np.int64))

    def __len__(self) -> int:
        return len(self.sizes)

    @cached_property
    def rank(self) -> np.ndarray:
        """Every node's place in its request's order (0: its best)."""
        return np.arange(len(self.values)) - self.first

    def is_within(self, counts: np.ndarray) -> np.ndarray:
        """Whether each node is among its request's best ``counts``."""
        return self.rank < counts[self.request]

    def expected_tokens(self, counts: np.ndarray) -> float:
        """Tokens all requests are expected to yield verifying their best ``counts`` nodes."""
        return len(self.sizes) + float(self.values[self.is_within(counts)].sum())

    def per_request(self, nodes: np.ndarray) -> np.ndarray:
        """How many of ``nodes`` (flat indices) each request has."""
        return np.bincount(self.request[nodes], minlength=len(self.sizes))

    @cached_property
    def _starts(self) -> np.ndarray:
        return np.cumsum(self.sizes) - self.sizes

    @cached_property
    def _prefix(self) -> np.ndarray:
        return np.concatenate(([0.0], np.cumsum(self.values)))

    def yields(self, counts: np.ndarray) -> np.ndarray:
        """Each request's expected tokens verifying its best ``counts`` (its last axis: the
        requests; any leading axes)."""
        return 1.0 + self._prefix[self._starts + counts] - self._prefix[self._starts]

    def needed(self, floors: np.ndarray) -> np.ndarray:
        """Each request's fewest best nodes whose expected tokens reach ``floors`` (all it has
        where they cannot); like ``yields``, over the last axis with any leading axes."""
        before = self._prefix[:-1] - self._prefix[self.first]  # its own request's better nodes
        short = 1.0 + before < floors[..., self.request] - 1e-9  # still short of the floor without it
        shorts = np.concatenate((np.zeros(short.shape[:-1] + (1,)), np.cumsum(short, axis=-1)), axis=-1)
        return (shorts[..., self._starts + self.sizes] - shorts[..., self._starts]).astype(np.int64)


def floor_counts(nodes: RankedNodes, floors: np.ndarray, budget: int) -> np.ndarray:
    """Phase 1: nodes per request that meet its floor (or all it has), the most urgent requests
    first, within ``budget`` in all."""
    if floors.max(initial=0.0) <= 1.0:  # every request is on track: the root's token suffices
        return np.zeros(len(nodes), dtype=np.int64)
    needed = nodes.needed(floors)
    urgent = np.argsort(-floors, kind="stable")
    wanted = needed[urgent]
    counts = np.empty_like(needed)
    counts[urgent] = np.minimum(wanted, np.maximum(budget - (np.cumsum(wanted) - wanted), 0))
    return counts


def harmless_floors(
    nodes: RankedNodes, floors_at: Callable[[np.ndarray], np.ndarray], iteration_s: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """The floors worth serving this step: those of the requests behind their SLO that the step
    can lift back on track without putting behind anyone it would have left on track.

    A floor grows with the iteration (``floors_at``: every request's floor after an iteration
    of the given seconds, for an array of them), and the iteration with the nodes verified
    (``iteration_s``: the seconds of verifying each row of an array of per-request node
    counts), so serving one request's floor raises everybody's. The requests behind are added
    cheapest first (fewest nodes); of those prefixes, the one that keeps the most requests on
    track wins among the ones that keep every request on track that was, and every one it
    serves (the fewest on ties). Returns the floors of the requests served (0 for the others)."""
    none = np.zeros((1, len(nodes)), dtype=np.int64)
    alone = floors_at(iteration_s(none))[0]
    on_track = nodes.yields(none[0]) >= alone - 1e-9
    behind = np.flatnonzero(~on_track & (alone <= nodes.yields(nodes.sizes)))
    if not len(behind):
        return np.zeros(len(nodes))
    order = behind[np.argsort(nodes.needed(alone)[behind], kind="stable")]
    rank = np.full(len(nodes), len(nodes) + 1)
    rank[order] = np.arange(len(order))
    served = rank < np.arange(len(order) + 1)[:, None]  # [prefix, request]
    counts = np.where(served, nodes.needed(alone), 0)
    for _ in range(3):  # serving a floor lengthens the step, which raises the floors: settle
        floors = floors_at(iteration_s(counts))
        settled = np.where(served, nodes.needed(floors), 0)
        if (settled == counts).all():
            break
        counts = settled
    else:
        floors = floors_at(iteration_s(counts))
    kept = nodes.yields(counts) >= floors - 1e-9
    harmless = (kept | ~(on_track | served)).all(axis=1)
    best = int(np.argmax(np.where(harmless, kept.sum(axis=1), -1)))
    return np.where(served[best], floors[best], 0.0)


def ranked_extras(nodes: RankedNodes, counts: np.ndarray) -> np.ndarray:
    """Phase 2's order: every node not yet chosen (flat index), best value first (ties: the
    earlier request first). Each request's values are sorted, so this never takes a node before
    a better one of the same request."""
    rest = np.flatnonzero(~nodes.is_within(counts))
    return rest[np.argsort(-nodes.values[rest], kind="stable")]


def select_nodes(nodes: RankedNodes, floors: np.ndarray, budget: int) -> np.ndarray:
    """Nodes to verify per request: floors first, then the best nodes up to ``budget`` in all."""
    counts = floor_counts(nodes, floors, budget)
    extras = ranked_extras(nodes, counts)[: max(budget - int(counts.sum()), 0)]
    return counts + nodes.per_request(extras)
