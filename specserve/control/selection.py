"""Which drafted nodes the target verifies: SLO floors first, then global value (AdaServe).

Each request offers its drafted nodes as values (calibrated acceptance probabilities) sorted from
best to worst; since values never grow along a path, any prefix of that order is a valid subtree.
A request's expected tokens from verifying its best ``n`` nodes is ``1 + sum(values[:n])`` (the
target always yields one token). Phase 1 gives every request the fewest nodes that lift its
expected tokens to its floor (what it needs to stay on its TPOT SLO), most urgent first; phase 2
spends what is left of the token budget on the best remaining nodes of all requests. Because each
request's gain is concave in its node count, this greedy maximises total expected tokens under
the budget among selections that meet every floor (when the budget allows that).
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter


@dataclass
class Candidates:
    """One request's drafted nodes as far as selection is concerned."""

    values: list[float]  # best first
    floor: float = 0.0  # expected tokens it needs this step; <= 1 means it is on track
    cap: int | None = None  # the most nodes it may verify

    @property
    def limit(self) -> int:
        return len(self.values) if self.cap is None else min(self.cap, len(self.values))

    def nodes_for_floor(self) -> int:
        """Fewest best nodes whose expected tokens reach the floor (or all it may verify)."""
        total = 1.0
        for n in range(self.limit):
            if total >= self.floor - 1e-9:
                return n
            total += self.values[n]
        return self.limit


def floor_counts(candidates: list[Candidates], budget: int) -> list[int]:
    """Phase 1: nodes per request that meet its floor, the most urgent requests first."""
    counts = [0] * len(candidates)
    for i in sorted(range(len(candidates)), key=lambda i: -candidates[i].floor):
        counts[i] = min(candidates[i].nodes_for_floor(), budget)
        budget -= counts[i]
    return counts


def ranked_extras(candidates: list[Candidates], counts: list[int]) -> list[tuple[int, float]]:
    """Phase 2's order: (request, value) of every node not yet chosen, best value first (ties:
    the earlier request first). Each request's values are sorted, so this never takes a node
    before a better one of the same request."""
    extras = [(i, value) for i, (c, n) in enumerate(zip(candidates, counts)) for value in c.values[n : c.limit]]
    return sorted(extras, key=itemgetter(1), reverse=True)  # stable: ties keep request order


def select_nodes(candidates: list[Candidates], budget: int) -> list[int]:
    """Nodes to verify per request: floors first, then the best nodes up to ``budget`` in all."""
    counts = floor_counts(candidates, budget)
    for i, _ in ranked_extras(candidates, counts)[: max(budget - sum(counts), 0)]:
        counts[i] += 1
    return counts
