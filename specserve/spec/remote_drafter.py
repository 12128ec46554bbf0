"""A draft model on its own Ray actor (another process, node or GPU than the target).

Each step makes one Ray call: the accepts and releases since the last step ride along with the
next proposal, in order, and so does the controller's drafting rule (plain data), which the actor
asks after each level itself instead of a round trip per level. A step that prefills prompts the
draft should read also sends them, without waiting for the actor. If the actor
dies, that step goes without speculation (every request still advances: verification is
lossless) and a new actor is started, which rebuilds its cache from the requests' tokens (an
EAGLE head reads zeros for the target features the dead actor took with it). The actor ends with
the engine (when its handle is dropped).
"""

from __future__ import annotations

import logging
from pathlib import Path

from specserve.config import EngineConfig
from specserve.control.cost_model import LatencyTable
from specserve.engine.heap import freeze_startup_heap
from specserve.models.eagle import is_eagle_draft
from specserve.spec.draft_model import ModelDrafter
from specserve.spec.drafter import DraftRequest, KeepGoing
from specserve.spec.tree import TokenTree

logger = logging.getLogger(__name__)

Update = tuple[str, str, list[int]]  # ("accept" | "release", request id, accepted tokens)


class DraftWorker:
    """The Ray actor: a ModelDrafter that applies the queued updates, then proposes."""

    def __init__(self, draft_path: Path, config: EngineConfig, target_vocab: int, max_len: int) -> None:
        self.drafter = ModelDrafter(draft_path, config, target_vocab, max_len)
        freeze_startup_heap()  # the actor's process exists to draft

    def step(
        self, updates: list[Update], requests: list[DraftRequest], keep_going: KeepGoing | None
    ) -> tuple[list[TokenTree], list[int]]:
        """Apply the updates, then propose: the trees and the tokens of each draft forward."""
        self._apply(updates)
        if not requests:
            return [], []
        return self.drafter.propose(requests, keep_going), self.drafter.forwards

    def read(self, updates: list[Update], requests: list[DraftRequest]) -> None:
        """Apply the updates, then read the requests' sequences."""
        self._apply(updates)
        self.drafter.read(requests)

    def _apply(self, updates: list[Update]) -> None:
        for kind, request_id, tokens in updates:
            if kind == "accept":
                self.drafter.accept(request_id, tokens)
            else:
                self.drafter.release(request_id)

    def profile(self, shape: dict) -> LatencyTable:
        return self.drafter.profile(**shape)


class RemoteDrafter:
    """The engine-side Drafter that drives a DraftWorker actor."""

    gives_acceptance_hints = False

    def __init__(self, draft_path: Path, config: EngineConfig, target_vocab: int, max_len: int,
                 num_cpus: float = 1, num_gpus: float = 0) -> None:
        import ray

        self.path = draft_path
        self._args = (draft_path, config, target_vocab, max_len)
        self._actor_class = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(DraftWorker)
        self._updates: list[Update] = []
        self.needs_target_features = is_eagle_draft(draft_path)
        self.restarts = 0
        self.forwards: list[int] = []
        # The actor's draft cache length per request, mirrored here: after drafting, up to the
        # root; after an accept, the accepted tokens too (an EAGLE draft keeps none of them).
        # It can run one ahead, when the draft never fed the deepest accepted node.
        self._cached: dict[str, int] = {}
        self.actor = self._actor_class.remote(*self._args)

    def propose(self, requests: list[DraftRequest], keep_going: KeepGoing | None = None) -> list[TokenTree]:
        import ray
        from ray.exceptions import RayActorError

        updates, self._updates = self._updates, []
        self._cached.update({r.request_id: len(r.token_ids) for r in requests if r.budget.depth > 0})
        try:
            trees, self.forwards = ray.get(self.actor.step.remote(updates, requests, keep_going))
            return trees
        except RayActorError as exc:
            logger.warning("draft actor died (%s); this step goes without speculation, restarting it", exc)
            self.restarts += 1
            self.forwards = []
            self._cached.clear()
            self.actor = self._actor_class.remote(*self._args)
            return [TokenTree() for _ in requests]

    def read(self, requests: list[DraftRequest]) -> None:
        """Sent without waiting: the actor reads while the target computes, and Ray runs an
        actor's calls in the order they were sent, so the next proposal finds the reads done
        (if the actor died meanwhile, that proposal restarts it)."""
        updates, self._updates = self._updates, []
        self._cached.update({r.request_id: len(r.token_ids) for r in requests})
        self.actor.read.remote(updates, requests)

    def profile(self, **shape) -> LatencyTable:
        """The draft forward's latency table, measured on the actor (no Ray call inside)."""
        import ray

        return ray.get(self.actor.profile.remote(shape))

    def pending(self, request_id: str, num_tokens: int) -> int:
        return num_tokens - self._cached.get(request_id, 0)

    def accept(self, request_id: str, tokens: list[int]) -> None:
        self._updates.append(("accept", request_id, list(tokens)))
        if request_id in self._cached and not self.needs_target_features:
            self._cached[request_id] += len(tokens)

    def release(self, request_id: str) -> None:
        self._updates.append(("release", request_id, []))
        self._cached.pop(request_id, None)
