"""Drafting with a small causal LM: beam-style tree expansion on path probability.

Per depth, every request's frontier (its ``width`` best nodes of the previous depth) goes into ONE
batched draft forward; each frontier node proposes its ``width`` most likely children, and the
``width`` children with the highest path probability become the next frontier (EAGLE-2 /
AdaServe). All expanded candidates stay in the tree; the ``max_nodes`` best by path probability
are proposed.

The draft keeps its own KV cache, slot for slot with the target's. Each step first feeds the
tokens the draft has not cached yet (the prompt on the first step, then the tokens accepted since
and the bonus token), then the frontier nodes depth by depth, behind the sequence, under a tree
mask. After verification the fed nodes of the accepted path are compacted behind the sequence
(like the target's cache); everything else is overwritten later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specserve.config import EngineConfig
from specserve.distributed.parallel_state import SINGLE_PROCESS
from specserve.engine.model_runner import ModelRunner
from specserve.models.forward_batch import SequenceSlice
from specserve.spec.drafter import DraftRequest, KeepGoing
from specserve.spec.tree import TokenTree

VOCAB_FILE = "draft_vocab.json"


class DraftVocabulary:
    """Maps a draft with a reduced vocabulary onto the target's token ids.

    ``draft_vocab.json`` lists, for every draft id, its target id; target tokens outside the
    list are fed to the draft as its last id (an unknown-token row it never proposes).
    """

    def __init__(self, to_target: list[int] | None, draft_vocab: int, target_vocab: int) -> None:
        if to_target is None:
            if draft_vocab != target_vocab:
                raise ValueError(
                    f"draft vocabulary ({draft_vocab}) differs from the target's ({target_vocab}) "
                    f"and the draft has no {VOCAB_FILE}"
                )
            self.to_target = torch.arange(target_vocab)
            self.to_draft = torch.arange(target_vocab)
            self.unknown = None
            return
        if len(to_target) != draft_vocab - 1 or max(to_target) >= target_vocab:
            raise ValueError(f"{VOCAB_FILE} does not match the draft ({draft_vocab - 1} known ids)")
        self.unknown = draft_vocab - 1
        self.to_target = torch.tensor(to_target + [-1])
        self.to_draft = torch.full((target_vocab,), self.unknown, dtype=torch.long)
        self.to_draft[torch.tensor(to_target)] = torch.arange(len(to_target))

    @classmethod
    def load(cls, path: Path, draft_vocab: int, target_vocab: int) -> DraftVocabulary:
        file = path / VOCAB_FILE
        to_target = json.loads(file.read_text())["target_ids"] if file.is_file() else None
        return cls(to_target, draft_vocab, target_vocab)


@dataclass
class _Expansion:
    """One request's tree while it grows."""

    request: DraftRequest
    root_pos: int  # position (and draft cache index) of the root
    tree: TokenTree = field(default_factory=TokenTree)
    frontier: list[int] = field(default_factory=list)
    fed: dict[int, int] = field(default_factory=dict)  # node -> draft cache index

    @property
    def tree_start(self) -> int:
        return self.root_pos + 1

    def next_slice(self, to_draft: torch.Tensor) -> SequenceSlice:
        """The frontier as new tokens behind the already fed nodes, each seeing its ancestors."""
        start = self.tree_start + len(self.fed)
        for k, node in enumerate(self.frontier):
            self.fed[node] = start + k
        span = start + len(self.frontier) - self.tree_start
        mask = torch.zeros(len(self.frontier), span, dtype=torch.bool)
        for k, node in enumerate(self.frontier):
            for ancestor in self.tree.path(node):
                mask[k, self.fed[ancestor] - self.tree_start] = True
        return SequenceSlice(
            slot=self.request.slot,
            token_ids=to_draft[[self.tree.tokens[n] for n in self.frontier]].tolist(),
            positions=[self.root_pos + self.tree.depths[n] for n in self.frontier],
            cache_start=start,
            tree_mask=mask,
            logits_at=list(range(len(self.frontier))),
            tree_start=self.tree_start,
        )

    def expand(self, parents: list[int], probs: torch.Tensor, to_target: torch.Tensor) -> None:
        """Add each parent's ``width`` best children; the best ``width`` become the frontier."""
        width = self.request.budget.width
        top_p, top_ids = probs.topk(width, dim=-1)
        children = []
        for parent, ps, ids in zip(parents, top_p.tolist(), to_target[top_ids].tolist()):
            children += [self.tree.add(t, parent, p) for p, t in zip(ps, ids) if p > 0.0]
        children.sort(key=lambda n: -self.tree.path_probs[n])
        self.frontier = children[:width]


class ModelDrafter:
    def __init__(self, draft_path: Path, engine_config: EngineConfig, target_vocab: int, max_len: int) -> None:
        config = engine_config.model_copy(
            update={"model": str(draft_path), "tensor_parallel_size": 1, "max_model_len": max_len}
        )
        self.path = draft_path
        self.runner = ModelRunner(config, draft_path, SINGLE_PROCESS)
        self.vocab = DraftVocabulary.load(draft_path, self.runner.model.arch.vocab_size, target_vocab)
        self._cached: dict[str, int] = {}  # request id -> tokens in the draft cache
        self._last: dict[str, _Expansion] = {}

    def propose(self, requests: list[DraftRequest], keep_going: KeepGoing | None = None) -> list[TokenTree]:
        growing = [_Expansion(r, len(r.token_ids) - 1) for r in requests if r.budget.depth > 0]
        if growing:
            self._expand_roots(growing)
        for depth in range(2, max((g.request.budget.depth for g in growing), default=0) + 1):
            level = [g for g in growing if g.request.budget.depth >= depth and g.frontier]
            if not level:
                break
            if keep_going is not None:
                trees = {g.request.request_id: g.tree for g in growing}
                if not keep_going(depth - 1, [trees.get(r.request_id, TokenTree()) for r in requests]):
                    break
            logits = self.runner.forward([g.next_slice(self.vocab.to_draft) for g in level])
            probs = self._probs(logits).split([len(g.frontier) for g in level])
            for g, p in zip(level, probs):
                g.expand(g.frontier, p, self.vocab.to_target)
        self._last = {g.request.request_id: g for g in growing}
        by_id = {g.request.request_id: g.tree.select(g.request.budget.node_limit) for g in growing}
        return [by_id.get(r.request_id, TokenTree()) for r in requests]

    def accept(self, request_id: str, tokens: list[int]) -> None:
        """Keep the fed nodes of the accepted path: compact them behind the root."""
        expansion = self._last.pop(request_id, None)
        if expansion is None:
            return
        tree, node, kept = expansion.tree, -1, []
        for token in tokens:
            node = tree.children(node).get(token, -2)
            if node not in expansion.fed:
                break
            kept.append(expansion.fed[node])
        start = expansion.tree_start
        if kept and kept != list(range(start, start + len(kept))):
            self.runner.kv_cache.keep(expansion.request.slot, kept, start)
        self._cached[request_id] = start + len(kept)

    def release(self, request_id: str) -> None:
        self._cached.pop(request_id, None)
        self._last.pop(request_id, None)

    def _expand_roots(self, growing: list[_Expansion]) -> None:
        """Feed what the draft has not cached yet, up to and including the root; expand the root."""
        slices = []
        for g in growing:
            cached = self._cached.get(g.request.request_id, 0)
            ids = self.vocab.to_draft[torch.tensor(g.request.token_ids[cached:])].tolist()
            slices.append(
                SequenceSlice(
                    slot=g.request.slot,
                    token_ids=ids,
                    positions=list(range(cached, g.root_pos + 1)),
                    cache_start=cached,
                    logits_at=[len(ids) - 1],
                )
            )
            self._cached[g.request.request_id] = g.root_pos + 1
        probs = self._probs(self.runner.forward(slices))
        for g, p in zip(growing, probs):
            g.expand([-1], p.unsqueeze(0), self.vocab.to_target)

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(dim=-1)
        if self.vocab.unknown is not None:  # never propose the unknown-token row
            probs[:, self.vocab.unknown] = 0.0
        return probs
