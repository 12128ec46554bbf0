"""Hybrid drafting: a draft model's tree and prompt-lookup continuations in one tree.

A small draft model predicts fluent text but cannot copy long spans from its context; prompt
lookup copies them for free but guesses wrong in free text. Each step both draft every request,
their trees are merged, and the merged tree is cut back to the request's node budget by path
probability. A lookup node's probability is the share of earlier matches that continued with it,
scaled by how often this request's lookups were right so far (the first token a lookup proposed
against the token the target chose there, whether or not it was verified; a new request starts
from the accuracy over all requests), so that lookups win
the budget in text that repeats its context and lose it in text that does not. Before the controller
plans a step, a matching lookup also offers it a hint of the request's acceptance, so that a
request whose text can be copied gets to speculate even where its history says not to.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from specserve.spec.drafter import DraftRequest, Drafter, KeepGoing
from specserve.spec.ngram import NgramDrafter
from specserve.spec.tree import TokenTree

PRIOR_ACCURACY = 0.5  # lookup accuracy before any outcome at all
SMOOTHING = 0.3  # weight of the newest outcome in a request's running accuracy
OVERALL_SMOOTHING = 0.02  # the same in the accuracy over all requests, which new requests start from


class HybridDrafter:
    gives_acceptance_hints = True

    def __init__(self, model: Drafter, lookup: NgramDrafter) -> None:
        self.model = model
        self.lookup = lookup
        self.needs_target_features = model.needs_target_features
        self._accuracy: dict[str, float] = {}  # request id -> running accuracy of its lookups
        self._overall = PRIOR_ACCURACY  # running accuracy of every request's lookups
        self._pending: dict[str, tuple[int, int]] = {}  # request id -> (position, token) of its last lookup

    def acceptance_hint(self, request_id: str, token_ids: list[int]) -> float | None:
        """A matching lookup's share of its best next token times the request's lookup accuracy
        (None without a match). Every call also scores the last lookup and remembers this one, so
        the accuracy is learned while the request does not speculate too."""
        self._score_last_lookup(request_id, token_ids)
        continuations = [c for c in self.lookup.continuations(token_ids, 1, request_id) if c]
        if not continuations:
            return None
        counts = Counter(c[0] for c in continuations)
        token, count = counts.most_common(1)[0]
        self._pending[request_id] = (len(token_ids), token)
        return self._accuracy.get(request_id, self._overall) * count / len(continuations)

    def propose(self, requests: list[DraftRequest], keep_going: KeepGoing | None = None) -> list[TokenTree]:
        for request in requests:
            self._score_last_lookup(request.request_id, request.token_ids)
        drafted = self.model.propose(requests, keep_going)
        looked_up = self.lookup.propose(requests)
        trees = []
        for request, draft, lookup in zip(requests, drafted, looked_up):
            if len(lookup):
                self._pending[request.request_id] = (len(request.token_ids), lookup.tokens[0])
                lookup = self._discounted(lookup, self._accuracy.get(request.request_id, self._overall))
                draft = draft.merge(lookup).select(request.budget.node_limit)
            trees.append(draft)
        return trees

    @property
    def forwards(self) -> Sequence[int]:
        return self.model.forwards

    def read(self, requests: list[DraftRequest]) -> None:
        self.model.read(requests)

    def pending(self, request_id: str, num_tokens: int) -> int:
        return self.model.pending(request_id, num_tokens)

    def accept(self, request_id: str, tokens: list[int]) -> None:
        self.model.accept(request_id, tokens)

    def release(self, request_id: str) -> None:
        self._accuracy.pop(request_id, None)
        self._pending.pop(request_id, None)
        self.lookup.release(request_id)
        self.model.release(request_id)

    def _score_last_lookup(self, request_id: str, token_ids: list[int]) -> None:
        """Fold the outcome of the request's last lookup (once the sequence holds the token the
        target chose at its position) into the request's running accuracy."""
        position, token = self._pending.get(request_id, (len(token_ids), -1))
        if position >= len(token_ids):
            return
        del self._pending[request_id]
        hit = float(token_ids[position] == token)
        before = self._accuracy.get(request_id, self._overall)
        self._accuracy[request_id] = (1 - SMOOTHING) * before + SMOOTHING * hit
        self._overall = (1 - OVERALL_SMOOTHING) * self._overall + OVERALL_SMOOTHING * hit

    @staticmethod
    def _discounted(tree: TokenTree, accuracy: float) -> TokenTree:
        """The lookup tree with its first level's probabilities scaled by ``accuracy``."""
        out = TokenTree()
        for token, parent, prob in zip(tree.tokens, tree.parents, tree.probs):
            out.add(token, parent, prob * accuracy if parent < 0 else prob)
        return out
