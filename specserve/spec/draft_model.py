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

An EAGLE draft (``models/eagle.py``) also reads a feature per fed token: the target's features
(which the engine hands over with each request) for the sequence, and its own predicted feature
at the parent for each tree node. Its K/V of tree nodes were computed from predicted features,
so after verification it keeps only the root and feeds the accepted tokens again next step, with
the target's features.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specserve.config import EngineConfig
from specserve.control.cost_model import LatencyTable
from specserve.control.profiler import profile_forward
from specserve.distributed.parallel_state import SINGLE_PROCESS
from specserve.engine.model_runner import ModelRunner
from specserve.models.eagle import EagleDraftModel
from specserve.models.forward_batch import SequenceSlice
from specserve.models.linear_kernel import KernelPlan, WeightLayout
from specserve.spec.drafter import DraftRequest, KeepGoing
from specserve.spec.tree import TokenTree

VOCAB_FILE = "draft_vocab.json"


def read_draft_vocabulary(draft_dir: Path) -> list[int] | None:
    """The target id of every draft id, from the draft's ``draft_vocab.json``; None without one
    (the draft shares the target's vocabulary)."""
    file = draft_dir / VOCAB_FILE
    return json.loads(file.read_text())["target_ids"] if file.is_file() else None


def write_draft_vocabulary(draft_dir: Path, target_ids: list[int]) -> None:
    """Record a reduced draft vocabulary (the target id of every draft id) next to its weights."""
    (draft_dir / VOCAB_FILE).write_text(json.dumps({"target_ids": target_ids}))


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
        return cls(read_draft_vocabulary(path), draft_vocab, target_vocab)


@dataclass
class _Expansion:
    """One request's tree while it grows."""

    request: DraftRequest
    root_pos: int  # position (and draft cache index) of the root
    tree: TokenTree = field(default_factory=TokenTree)
    frontier: list[int] = field(default_factory=list)
    fed: dict[int, int] = field(default_factory=dict)  # node -> draft cache index
    predicted: dict[int, torch.Tensor] = field(default_factory=dict)  # node (-1: root) -> EAGLE output

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

    def frontier_features(self) -> torch.Tensor:
        """EAGLE inputs of the frontier: the feature predicted at each node's parent."""
        return torch.stack([self.predicted[self.tree.parents[n]] for n in self.frontier])

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
    gives_acceptance_hints = False

    def __init__(self, draft_path: Path, engine_config: EngineConfig, target_vocab: int, max_len: int) -> None:
        dtype = engine_config.draft_dtype()
        int8 = dtype == "int8"  # float32 activations and cache, int8 weights
        config = engine_config.model_copy(update={
            "model": str(draft_path), "tensor_parallel_size": 1, "max_model_len": max_len,
            "dtype": "float32" if int8 else dtype,
        })
        self.path = draft_path
        plans = KernelPlan.single(WeightLayout.INT8_DYNAMIC) if int8 else None
        self.runner = ModelRunner(config, draft_path, SINGLE_PROCESS, plans)
        self.vocab = DraftVocabulary.load(draft_path, self.runner.model.arch.vocab_size, target_vocab)
        self.needs_target_features = isinstance(self.runner.model, EagleDraftModel)
        self._hidden_size = self.runner.model.arch.hidden_size
        self._cached: dict[str, int] = {}  # request id -> tokens in the draft cache
        self._features: dict[str, list[torch.Tensor]] = {}  # EAGLE: target features not fed yet
        self._last: dict[str, _Expansion] = {}
        self.forwards: list[int] = []

    def propose(self, requests: list[DraftRequest], keep_going: KeepGoing | None = None) -> list[TokenTree]:
        self.forwards = []
        self._queue_features(requests)
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
            slices = [g.next_slice(self.vocab.to_draft) for g in level]
            features = torch.cat([g.frontier_features() for g in level]) if self.needs_target_features else None
            logits, hidden = self._forward(slices, features)
            self.forwards.append(sum(len(s.token_ids) for s in slices))
            sizes = [len(g.frontier) for g in level]
            if self.needs_target_features:
                for g, h in zip(level, hidden.split(sizes)):
                    g.predicted.update(zip(g.frontier, h))
            for g, p in zip(level, self._probs(logits).split(sizes)):
                g.expand(g.frontier, p, self.vocab.to_target)
        self._last = {g.request.request_id: g for g in growing}
        by_id = {g.request.request_id: g.tree.select(g.request.budget.node_limit) for g in growing}
        return [by_id.get(r.request_id, TokenTree()) for r in requests]

    def read(self, requests: list[DraftRequest]) -> None:
        """Cache each request's sequence without drafting (a prompt, in the step that prefills
        it): its first tree then feeds only its root. An EAGLE draft keeps the target's feature
        of the last position read, the input of that root."""
        requests = [r for r in requests if self.pending(r.request_id, len(r.token_ids)) > 0]
        if not requests:
            return
        self._queue_features(requests)
        slices = [self._catch_up(r, logits=False) for r in requests]
        features = []
        if self.needs_target_features:
            for r, s in zip(requests, slices):
                count = len(s.token_ids)
                fed = self._take_features(r.request_id, s.cache_start, count + 1)
                features.append(fed[:count])
                self._features[r.request_id] = [fed[count:]]
        self._forward(slices, torch.cat(features) if features else None)

    def pending(self, request_id: str, num_tokens: int) -> int:
        return num_tokens - self._cached.get(request_id, 0)

    def accept(self, request_id: str, tokens: list[int]) -> None:
        """Keep the fed nodes of the accepted path: compact them behind the root (an EAGLE draft
        keeps only the root and feeds the accepted tokens again with the target's features)."""
        expansion = self._last.pop(request_id, None)
        if expansion is None:
            return
        # An EAGLE draft's tree K/V came from predicted features: it keeps none of the path.
        accepted = [] if self.needs_target_features else tokens
        tree, node, kept = expansion.tree, -1, []
        for token in accepted:
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
        self._features.pop(request_id, None)
        self._last.pop(request_id, None)

    def profile(self, **shape) -> LatencyTable:
        """The draft forward's latency table (``profile_forward``'s keyword arguments)."""
        return profile_forward(self.profile_forward, label="draft", **shape)

    def profile_forward(self, slices: list[SequenceSlice]) -> torch.Tensor:
        """One draft forward for the profiler (an EAGLE draft reads zero features)."""
        return self._forward(slices, self._zeros(sum(len(s.token_ids) for s in slices)))[0]

    def _expand_roots(self, growing: list[_Expansion]) -> None:
        """Feed what the draft has not cached yet, up to and including the root; expand the root."""
        slices = [self._catch_up(g.request, logits=True) for g in growing]
        features = [
            self._take_features(g.request.request_id, s.cache_start, len(s.token_ids)) for g, s in zip(growing, slices)
        ] if self.needs_target_features else []
        logits, hidden = self._forward(slices, torch.cat(features) if features else None)
        self.forwards.append(sum(len(s.token_ids) for s in slices))
        if self.needs_target_features:
            ends = torch.tensor([len(s.token_ids) for s in slices]).cumsum(0) - 1
            for g, h in zip(growing, hidden[ends]):
                g.predicted[-1] = h
        for g, p in zip(growing, self._probs(logits)):
            g.expand([-1], p.unsqueeze(0), self.vocab.to_target)

    def _catch_up(self, request: DraftRequest, logits: bool) -> SequenceSlice:
        """What the draft has not cached of the request's sequence, as one slice (with the logits
        of its last token when ``logits``); the draft holds the whole sequence after feeding it."""
        cached = self._cached.get(request.request_id, 0)
        ids = self.vocab.to_draft[torch.tensor(request.token_ids[cached:])].tolist()
        self._cached[request.request_id] = len(request.token_ids)
        return SequenceSlice(
            slot=request.slot,
            token_ids=ids,
            positions=list(range(cached, len(request.token_ids))),
            cache_start=cached,
            logits_at=[len(ids) - 1] if logits else [],
        )

    def _queue_features(self, requests: list[DraftRequest]) -> None:
        """Keep the target features the requests carry (EAGLE) until their positions are fed."""
        if self.needs_target_features:
            for r in requests:
                if r.features is not None:
                    self._features.setdefault(r.request_id, []).append(r.features)

    def _take_features(self, request_id: str, cached: int, count: int) -> torch.Tensor:
        """The input features of ``count`` positions from ``cached`` on: the target's feature of
        each previous position (none before position 0)."""
        parts = ([self._zeros(1)] if cached == 0 else []) + self._features.pop(request_id, [])
        features = torch.cat(parts) if parts else self._zeros(0)
        if len(features) > count:
            raise RuntimeError(
                f"request {request_id!r}: {len(features)} target features for {count} new draft positions"
            )
        # Fewer only after a restarted draft actor lost the older ones: those positions read zeros.
        return torch.cat([self._zeros(count - len(features)), features])

    def _forward(
        self, slices: list[SequenceSlice], features: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the slices' ``logits_at`` and, for an EAGLE draft, hidden states of every fed token."""
        if not self.needs_target_features:
            return self.runner.forward(slices), torch.empty(0)
        return self.runner.forward_with_hidden(slices, features)

    def _zeros(self, rows: int) -> torch.Tensor:
        return torch.zeros(rows, self._hidden_size)

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.float().softmax(dim=-1)
        if self.vocab.unknown is not None:  # never propose the unknown-token row
            probs[:, self.vocab.unknown] = 0.0
        return probs
