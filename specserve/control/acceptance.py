"""Acceptance prediction: draft confidence, calibrated online against verification outcomes.

A node's value is its path probability f(v), the drafter's estimate that the target accepts the
whole path to it. Each verification tells, for every verified node, whether it lay on the accepted
path; per depth the predictor keeps decayed sums of predicted f and of outcomes and scales f by
their ratio (with a prior that trusts the drafter until evidence says otherwise). It also keeps the
per-token acceptance rate alpha (accepted / (accepted + rejections)), overall and per request, and
the mean draft confidence, which the chain policies use to extrapolate.
"""

from __future__ import annotations

from dataclasses import dataclass

from specserve.spec.tree import TokenTree, TreeBudget

_DECAY = 0.99  # per observed step: roughly the last hundred steps count
_PRIOR = 2.0  # pseudo-observations of a perfectly calibrated drafter, per depth
_REQUEST_DECAY = 0.7  # per step of a request: its last few steps count
_REQUEST_PRIOR = 1.0  # pseudo-tokens at the overall rate in a request's own rate
_MAX_DEPTH = TreeBudget.model_fields["depth"].metadata[-1].le  # no tree is deeper


@dataclass
class _Rate:
    """Decayed counts of accepted tokens and rejections."""

    accepted: float = 0.0
    rejected: float = 0.0

    def add(self, accepted: int, rejected: int, decay: float = _DECAY) -> None:
        self.accepted = self.accepted * decay + accepted
        self.rejected = self.rejected * decay + rejected

    def value(self, prior: float, weight: float = _PRIOR) -> float:
        """The rate, with ``weight`` pseudo-tokens at ``prior``."""
        total = self.accepted + self.rejected
        return (self.accepted + weight * prior) / (total + weight)


def calibrated_values(tree: TokenTree, scales: list[float]) -> list[float]:
    """Every node's path probability times its depth's calibration, never above its parent's."""
    values: list[float] = []
    for f, depth, parent in zip(tree.path_probs, tree.depths, tree.parents):
        ceiling = 1.0 if parent < 0 else values[parent]
        values.append(min(f * scales[depth], ceiling))
    return values


class AcceptancePredictor:
    def __init__(self, prior_rate: float = 0.5) -> None:
        # Decayed per-depth sums, stored divided by _unit (the decay so far) so that an
        # observation touches only the depths it has; see _decay.
        self._predicted = [0.0] * (_MAX_DEPTH + 1)
        self._observed = [0.0] * (_MAX_DEPTH + 1)
        self._unit = 1.0
        self._rate = _Rate()
        self._prior_rate = prior_rate
        self._request_rate: dict[str, _Rate] = {}
        self._confidence_sum = 0.0
        self._confidence_count = 0.0

    def scale(self, depth: int) -> float:
        """Observed over predicted acceptance of nodes at ``depth``."""
        unit = self._unit
        return (self._observed[depth] * unit + _PRIOR) / (self._predicted[depth] * unit + _PRIOR)

    def _decay(self) -> None:
        """Age every per-depth sum by one observation (by shrinking the unit they are kept in)."""
        self._unit *= _DECAY
        if self._unit < 1e-150:
            self._predicted = [p * self._unit for p in self._predicted]
            self._observed = [o * self._unit for o in self._observed]
            self._unit = 1.0

    def scales(self, max_depth: int) -> list[float]:
        """``scale(depth)`` for depths 0 .. ``max_depth``."""
        return [self.scale(depth) for depth in range(max_depth + 1)]

    def values(self, tree: TokenTree) -> list[float]:
        """Calibrated acceptance probability of every node, never above its parent's."""
        return calibrated_values(tree, self.scales(max(tree.depths, default=0)))

    @property
    def rate(self) -> float:
        """Per-token acceptance rate alpha over recent steps of all requests."""
        return self._rate.value(self._prior_rate)

    def request_rate(self, request_id: str) -> float:
        return self.request_rates([request_id])[0]

    def request_rates(self, request_ids: list[str]) -> list[float]:
        """``request_rate`` of each request (the overall rate for those not seen yet)."""
        overall, rates = self.rate, self._request_rate
        return [rates[i].value(overall, _REQUEST_PRIOR) if i in rates else overall for i in request_ids]

    @property
    def mean_confidence(self) -> float:
        """Mean draft probability of recently drafted tokens (the next token's best guess)."""
        if self._confidence_count == 0:
            return self._prior_rate
        return self._confidence_sum / self._confidence_count

    def observe(self, request_id: str, tree: TokenTree, accepted_nodes: list[int]) -> None:
        """Learn from one verification of ``tree`` that accepted the path ``accepted_nodes``."""
        self._decay()
        weight, predicted, observed, depths = 1.0 / self._unit, self._predicted, self._observed, tree.depths
        for f, depth in zip(tree.path_probs, depths):
            predicted[depth] += f * weight
        for node in accepted_nodes:  # one per depth, from the first
            observed[depths[node]] += weight
        self._confidence_sum = self._confidence_sum * _DECAY + sum(tree.probs)
        self._confidence_count = self._confidence_count * _DECAY + len(tree)
        accepted = len(accepted_nodes)
        rejected = int(accepted < max(tree.depths, default=0))
        self._rate.add(accepted, rejected)
        self._request_rate.setdefault(request_id, _Rate()).add(accepted, rejected, _REQUEST_DECAY)

    def skip(self, request_id: str) -> None:
        """``request_id`` decodes a step without speculating: its evidence ages as in a step."""
        if request_id in self._request_rate:
            self._request_rate[request_id].add(0, 0, _REQUEST_DECAY)

    def forget(self, request_id: str) -> None:
        self._request_rate.pop(request_id, None)
