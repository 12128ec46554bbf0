"""Prompt-lookup drafting: continue the sequence the way it continued after earlier copies of
its last n tokens (no model; pays off on repetitive or retrieval-heavy text)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from specserve.spec.drafter import DraftRequest, KeepGoing
from specserve.spec.tree import TokenTree

MAX_MATCHES = 16  # most recent occurrences considered


class NgramDrafter:
    needs_target_features = False
    gives_acceptance_hints = False
    forwards: tuple[int, ...] = ()  # no model

    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError("n-gram sizes must satisfy 1 <= min_n <= max_n")
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, requests: list[DraftRequest], keep_going: KeepGoing | None = None) -> list[TokenTree]:
        """Trees from earlier text; lookup costs next to nothing, so ``keep_going`` is not asked."""
        return [self._tree(r) for r in requests]

    def read(self, requests: list[DraftRequest]) -> None:
        pass  # lookups read the sequence when they draft

    def pending(self, request_id: str, num_tokens: int) -> int:
        return 0

    def accept(self, request_id: str, tokens: list[int]) -> None:
        pass

    def release(self, request_id: str) -> None:
        pass

    def continuations(self, token_ids: list[int], length: int) -> list[list[int]]:
        """Up to ``length`` tokens that followed each earlier occurrence of the longest matching
        suffix (n from max_n down to min_n), most recent occurrence first."""
        context = np.asarray(token_ids)
        for n in range(min(self.max_n, len(context) - 1), self.min_n - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(context[:-1], n)
            starts = np.flatnonzero((windows == context[-n:]).all(axis=1))
            if starts.size:
                return [token_ids[s + n : s + n + length] for s in starts[::-1][:MAX_MATCHES]]
        return []

    def _tree(self, request: DraftRequest) -> TokenTree:
        """A trie of the continuations; a node's probability is the share of the matches through
        its parent that continue with it. Each node keeps its ``width`` most frequent children."""
        budget = request.budget
        tree = TokenTree()
        if budget.depth == 0:
            return tree
        groups: list[tuple[int, list[list[int]]]] = [(-1, self.continuations(request.token_ids, budget.depth))]
        for depth in range(budget.depth):
            next_groups = []
            for parent, conts in groups:
                counts = Counter(c[depth] for c in conts if len(c) > depth)
                total = sum(counts.values())
                for token, count in counts.most_common(budget.width):
                    node = tree.add(token, parent, count / total)
                    next_groups.append((node, [c for c in conts if len(c) > depth and c[depth] == token]))
            groups = next_groups
        return tree.select(budget.node_limit)
