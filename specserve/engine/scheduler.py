"""Continuous batching: which requests run this step, and how many of their tokens.

A request's new tokens are the ones not yet in its KV slot: the (rest of the) prompt while it
prefills, the last sampled token while it decodes. A decoding request may also reserve room in
the step for drafted tokens to verify. Running requests go first, then waiting ones are admitted
earliest TTFT deadline first (arrival order among equal deadlines) while a KV slot is free and
the step's token budget lasts; a request waits rather than evicting anything. Long prompts are
prefilled in chunks across steps, beside other requests' decodes.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from specserve.engine.request import Request, RequestStatus
from specserve.models.kv_cache import SlotAllocator
from specserve.spec.tree import TreeBudget


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    draft_budget: TreeBudget | None = None  # the tree it may draft, within the room reserved for it

    @property
    def num_draft_tokens(self) -> int:
        return 0 if self.draft_budget is None else self.draft_budget.node_limit

    @property
    def completes_context(self) -> bool:
        """After this step every token of the request is cached: a next token is due."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens

    @property
    def samples(self) -> bool:
        """This step picks the request's next token(s): its context completes and it generates."""
        return self.completes_context and self.request.params.max_tokens > 0

    @property
    def num_prompt_logits(self) -> int:
        """How many of the step's new tokens are followed by a prompt token whose log-probability
        the request asked for (prompt_logprobs): the logits rows that score its prompt."""
        request = self.request
        if request.params.prompt_logprobs is None:
            return 0
        start = request.num_computed_tokens
        return max(0, min(start + self.num_new_tokens, len(request.prompt_token_ids) - 1) - start)


class Scheduler:
    def __init__(self, num_slots: int, max_num_batched_tokens: int) -> None:
        self.slots = SlotAllocator(num_slots)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Request] = []  # by (TTFT deadline, arrival)
        self.running: list[Request] = []
        self._order: dict[str, tuple[float, int]] = {}
        self._arrivals = itertools.count()

    def add(self, request: Request) -> None:
        self._order[request.request_id] = (request.ttft_deadline, next(self._arrivals))
        bisect.insort(self.waiting, request, key=lambda r: self._order[r.request_id])

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self, draft_budgets: dict[str, TreeBudget] | None = None) -> list[ScheduledRequest]:
        """``draft_budgets``: the trees decoding requests (by id) would like verified; each gets
        its tree shrunk to the room left in the step's token budget."""
        budget = self.max_num_batched_tokens
        scheduled = []
        for request in self.running:
            if budget == 0:
                break
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            budget -= n
            wanted = (draft_budgets or {}).get(request.request_id)
            draft = None
            if wanted is not None and request.is_decoding and budget > 0:
                draft = wanted.within(wanted.depth, budget)
                budget -= draft.node_limit
            scheduled.append(ScheduledRequest(request, n, draft))
        while self.waiting and budget > 0 and self.slots.num_free:
            request = self.waiting.pop(0)
            self._order.pop(request.request_id)
            request.slot = self.slots.allocate()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            n = min(request.num_tokens, budget)
            scheduled.append(ScheduledRequest(request, n))
            budget -= n
        return scheduled

    def take_hopeless(self, now: float, prefill_s: Callable[[Request], float]) -> list[Request]:
        """Waiting requests whose first token can no longer come by their TTFT deadline (now plus
        their predicted prefill is past it), taken out of the queue."""
        late = [r for r in self.waiting if now + prefill_s(r) > r.ttft_deadline]
        for request in late:
            self.remove(request)
        return late

    def remove(self, request: Request) -> None:
        """Take a finished or aborted request out and free its KV slot."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
            self._order.pop(request.request_id)
        if request.slot is not None:
            self.slots.free(request.slot)
            request.slot = None
