"""Prompt-lookup drafting: continue the sequence the way it continued after earlier copies of
its last n tokens (no model; pays off on repetitive or retrieval-heavy text).

Each request's n-grams are indexed as its sequence grows, so that a lookup costs the same at any
context length: scanning the whole sequence took 55 us at 300 tokens and 240 us at 3,000 here,
twice per request and step with hybrid drafting (the acceptance hint, then the tree); a lookup
in the index takes about 7 us at either length, and indexing about 1 us a token, once.
"""

from __future__ import annotations

from collections import Counter

from specserve.spec.drafter import DraftRequest, KeepGoing
from specserve.spec.tree import TokenTree

MAX_MATCHES = 16  # most recent occurrences considered


class NgramIndex:
    """Where every n-gram of ``sizes`` tokens starts in a sequence that only grows."""

    def __init__(self, sizes: range) -> None:
        self.sizes = sizes
        self.starts: dict[tuple[int, ...], list[int]] = {}  # n-gram -> its starts, ascending
        self.end = 0  # the n-grams within the sequence's first ``end`` tokens are indexed
        self._last: int | None = None  # the token at end - 1, to tell a sequence that changed

    def indexes_a_prefix_of(self, token_ids: list[int], end: int) -> bool:
        """Whether what is indexed can be a prefix of ``token_ids[:end]`` (its last token checked)."""
        return self.end <= end and (self.end == 0 or token_ids[self.end - 1] == self._last)

    def extend(self, token_ids: list[int], end: int) -> None:
        """Index the n-grams within ``token_ids[:end]`` not indexed yet."""
        starts = self.starts
        for n in self.sizes:
            first = max(self.end - n + 1, 0)  # the n-grams that end past the indexed tokens
            columns = [token_ids[first + i : end - n + 1 + i] for i in range(n)]
            for start, ngram in enumerate(zip(*columns), first):
                starts.setdefault(ngram, []).append(start)
        if end > self.end:
            self.end, self._last = end, token_ids[end - 1]


class NgramDrafter:
    needs_target_features = False
    gives_acceptance_hints = False
    forwards: tuple[int, ...] = ()  # no model

    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError("n-gram sizes must satisfy 1 <= min_n <= max_n")
        self.min_n = min_n
        self.max_n = max_n
        self._indexes: dict[str, NgramIndex] = {}  # request id -> the index of its sequence

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
        self._indexes.pop(request_id, None)

    def continuations(self, token_ids: list[int], length: int, request_id: str | None = None) -> list[list[int]]:
        """Up to ``length`` tokens that followed each earlier occurrence of the longest matching
        suffix (n from max_n down to min_n), most recent occurrence first. With ``request_id``
        the request's index is kept and extended from one call to the next."""
        index = self._index(request_id, token_ids)
        for n in range(min(self.max_n, len(token_ids) - 1), self.min_n - 1, -1):
            if starts := index.starts.get(tuple(token_ids[-n:])):
                return [token_ids[s + n : s + n + length] for s in starts[: -MAX_MATCHES - 1 : -1]]
        return []

    def _index(self, request_id: str | None, token_ids: list[int]) -> NgramIndex:
        """The index of every n-gram before the last token (an occurrence must have a next token)."""
        end = len(token_ids) - 1
        index = self._indexes.get(request_id) if request_id is not None else None
        if index is None or not index.indexes_a_prefix_of(token_ids, end):
            index = NgramIndex(range(self.min_n, self.max_n + 1))
            if request_id is not None:
                self._indexes[request_id] = index
        index.extend(token_ids, end)
        return index

    def _tree(self, request: DraftRequest) -> TokenTree:
        """A trie of the continuations; a node's probability is the share of the matches through
        its parent that continue with it. Each node keeps its ``width`` most frequent children."""
        budget = request.budget
        tree = TokenTree()
        if budget.depth == 0:
            return tree
        matches = self.continuations(request.token_ids, budget.depth, request.request_id)
        groups: list[tuple[int, list[list[int]]]] = [(-1, matches)]
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
