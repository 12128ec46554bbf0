"""Token trees: what a drafter proposes and the target verifies.

A tree hangs below a *root*: the last token of the sequence, already chosen but not yet in the
target's KV cache. Nodes are stored parents-first (``parents[i] < i``; -1 is the root), each with
its token, its draft probability ``p`` and its path probability ``f`` (product of ``p`` from the
root, the drafter's estimate that the target accepts the whole path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field


MAX_DEPTH = 32  # the longest path a tree may have


class TreeBudget(BaseModel):
    """How much one request may speculate in one step.

    ``depth`` bounds the path length, ``width`` the children kept per depth (1 is a chain),
    ``max_nodes`` the nodes sent to the target. ``depth == 0`` turns speculation off.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    depth: int = Field(default=4, ge=0, le=MAX_DEPTH)
    width: int = Field(default=1, ge=1, le=16)
    max_nodes: int | None = Field(default=None, ge=1, le=256, description="None: depth * width")

    @property
    def node_limit(self) -> int:
        return min(self.max_nodes or self.depth * self.width, self.depth * self.width)

    def within(self, max_depth: int, max_nodes: int) -> TreeBudget:
        """This budget shrunk to at most ``max_depth`` levels and ``max_nodes`` nodes."""
        limit = self.node_limit
        if self.depth <= max_depth and limit <= max_nodes:
            return self
        nodes = min(limit, max_nodes)
        depth = min(self.depth, max_depth) if nodes > 0 else 0
        if depth == self.depth and nodes == limit:
            return self
        return TreeBudget(depth=max(depth, 0), width=self.width, max_nodes=max(nodes, 1))

    def fit(self, remaining_tokens: int, free_positions: int) -> TreeBudget:
        """This budget for a request that may emit ``remaining_tokens`` more tokens and has
        ``free_positions`` KV positions after its root (an accepted path plus the bonus token
        must fit both)."""
        return self.within(min(remaining_tokens - 1, free_positions // self.width), free_positions)


@dataclass
class TokenTree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    path_probs: list[float] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)  # 1 for children of the root
    num_candidates: int = 0  # nodes drafted before ``select`` kept the best

    @property
    def num_drafted(self) -> int:
        return max(self.num_candidates, len(self))

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int, prob: float) -> int:
        """Append a node below ``parent`` (-1: the root); returns its index."""
        parent_f, parent_depth = (1.0, 0) if parent < 0 else (self.path_probs[parent], self.depths[parent])
        self.tokens.append(token)
        self.parents.append(parent)
        self.probs.append(prob)
        self.path_probs.append(parent_f * prob)
        self.depths.append(parent_depth + 1)
        return len(self.tokens) - 1

    def children(self, node: int) -> dict[int, int]:
        """token -> child index, for the children of ``node`` (-1: the root)."""
        return {self.tokens[i]: i for i, p in enumerate(self.parents) if p == node}

    def select(self, max_nodes: int, values: list[float] | None = None) -> TokenTree:
        """The ``max_nodes`` nodes of highest value (default: path probability), re-indexed
        parents-first.

        Values must never grow along a path (f does not), so the selection keeps every chosen
        node's ancestors (ties are broken toward shallower nodes).
        """
        if len(self) <= max_nodes:
            return self
        values = self.path_probs if values is None else values
        order = sorted(range(len(self)), key=lambda i: (-values[i], self.depths[i], i))
        return self._subtree(sorted(order[:max_nodes], key=lambda i: (self.depths[i], i)))

    def keep(self, kept: Sequence[bool]) -> TokenTree:
        """The nodes marked in ``kept``, which must mark every kept node's parent too."""
        return self if all(kept) else self._subtree([i for i, keep in enumerate(kept) if keep])

    def _subtree(self, chosen: list[int]) -> TokenTree:
        """The ``chosen`` nodes (parents before children, every ancestor among them), re-indexed."""
        new_index = {old: new for new, old in enumerate(chosen)}
        new_index[-1] = -1
        return TokenTree(
            tokens=[self.tokens[i] for i in chosen],
            parents=[new_index[self.parents[i]] for i in chosen],
            probs=[self.probs[i] for i in chosen],
            path_probs=[self.path_probs[i] for i in chosen],  # every ancestor came along
            depths=[self.depths[i] for i in chosen],
            num_candidates=self.num_drafted,
        )

    def merge(self, other: TokenTree) -> TokenTree:
        """The union of both trees' paths (both parents-first); a node both propose keeps the
        higher of its two probabilities."""
        merged: dict[tuple[int, int], int] = {}  # (merged parent, token) -> merged node
        parents, tokens, probs = [], [], []
        for tree in (self, other):
            index = {-1: -1}
            for node, (token, parent, prob) in enumerate(zip(tree.tokens, tree.parents, tree.probs)):
                key = (index[parent], token)
                if key in merged:
                    probs[merged[key]] = max(probs[merged[key]], prob)
                else:
                    merged[key] = len(tokens)
                    parents.append(key[0])
                    tokens.append(token)
                    probs.append(prob)
                index[node] = merged[key]
        out = TokenTree()
        for token, parent, prob in zip(tokens, parents, probs):
            out.add(token, parent, prob)
        out.num_candidates = self.num_drafted + other.num_drafted - (len(self) + len(other) - len(out))
        return out

    def path(self, node: int) -> list[int]:
        """Node indices from the root's child down to ``node``."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def token_paths(self) -> list[list[int]]:
        """Each node's tokens from the root's child down to it."""
        return [[self.tokens[i] for i in self.path(node)] for node in range(len(self))]

    def attention_mask(self) -> torch.Tensor:
        """[n+1, n+1] bool over (root, nodes...): each entry sees itself and its ancestors."""
        n = len(self)
        mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
        mask[:, 0] = True
        mask[0, 0] = True
        for i, parent in enumerate(self.parents):
            row = i + 1
            if parent >= 0:
                mask[row] = mask[parent + 1]
            mask[row, row] = True
        return mask
