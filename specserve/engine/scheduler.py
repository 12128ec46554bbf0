"""Continuous batching: which requests run this step, and how many of their tokens.

A request's new tokens are the ones not yet in its KV slot: the (rest of the) prompt while it
prefills, the last sampled token while it decodes. A decoding request may also reserve room in
the step for drafted tokens to verify. Running requests go first, then waiting ones are admitted
earliest TTFT deadline first (arrival order among equal deadlines) while a KV slot is free and
the step's token budget lasts; a request waits rather than evicting anything. Long prompts are
prefilled in chunks across steps, beside other requests' decodes. A waiting request whose first
token can no longer come by its TTFT deadline is either rejected (``take_hopeless``) or, served
best effort, moved behind every request that can still make its own (``demote_hopeless``):
in earliest-deadline order alone, the requests already late would go first under overload and
make the ones behind them late too. The controller may cap the prompt tokens of a step
(``PromptCap``), and give a request whose prompt a step completes room to verify a drafted tree
in it (``add_drafts``).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

from specserve.engine.request import Request, RequestStatus
from specserve.models.kv_cache import SlotAllocator
from specserve.spec.tree import TreeBudget


@dataclass(frozen=True)
class PromptCap:
    """At most ``tokens`` prompt tokens in a step for the requests that can wait, those whose
    TTFT deadline is later than ``waits_if_due_after``, and none for those whose deadline is also
    later than ``holds_if_due_after``. The others go first, up to ``max_tokens`` prompt tokens
    in the step (counting those of the requests before them)."""

    tokens: int
    waits_if_due_after: float
    holds_if_due_after: float = math.inf
    max_tokens: int | None = None  # None: what the step's token budget leaves


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
        self.late: list[Request] = []  # waiting after ``waiting``, in the same order
        self.running: list[Request] = []
        self._order: dict[str, tuple[float, int]] = {}
        self._arrivals = itertools.count()

    def add(self, request: Request) -> None:
        self._order[request.request_id] = (request.ttft_deadline, next(self._arrivals))
        bisect.insort(self.waiting, request, key=self._order_of)

    def _order_of(self, request: Request) -> tuple[float, int]:
        return self._order[request.request_id]

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.late) + len(self.running)

    @property
    def has_prompts(self) -> bool:
        """Whether any request still has prompt tokens to prefill."""
        return bool(self.waiting or self.late) or any(r.is_prefilling for r in self.running)

    @property
    def queued_prompt_tokens(self) -> int:
        """Prompt tokens still to prefill, of running requests and of waiting ones that are not
        late: what a waiting prompt's TTFT deadline must leave room for."""
        prefilling = (r for r in self.running if not r.is_decoding)
        return sum(r.num_tokens - r.num_computed_tokens for r in itertools.chain(prefilling, self.waiting))

    def schedule(
        self, draft_budgets: dict[str, TreeBudget] | None = None, prompt_cap: PromptCap | None = None
    ) -> list[ScheduledRequest]:
        """``draft_budgets``: the trees decoding requests (by id) would like verified; each gets
        its tree shrunk to the room left in the step's token budget. ``prompt_cap``: how many
        prompt tokens the step takes at most (a request it leaves out keeps its place)."""
        budget = self.max_num_batched_tokens
        paced = None if prompt_cap is None else prompt_cap.tokens  # prompt tokens left for those that can wait
        capped = None if prompt_cap is None else prompt_cap.max_tokens  # prompt tokens left for all

        def prompt_tokens(request: Request) -> int:
            nonlocal budget, paced, capped
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if prompt_cap is not None and request.is_prefilling:
                if request.ttft_deadline > prompt_cap.waits_if_due_after:
                    held = request.ttft_deadline > prompt_cap.holds_if_due_after
                    n = 0 if held else min(n, paced)
                    paced -= n
                elif capped is not None:
                    n = min(n, max(capped, 0))
                if capped is not None:
                    capped -= n
            budget -= n
            return n

        scheduled = []
        for request in self.running:
            if budget == 0:
                break
            if not request.is_decoding:
                if n := prompt_tokens(request):
                    scheduled.append(ScheduledRequest(request, n))
                continue
            budget -= 1
            draft = _within_room((draft_budgets or {}).get(request.request_id), budget)
            budget -= 0 if draft is None else draft.node_limit
            scheduled.append(ScheduledRequest(request, 1, draft))
        for request in self.waiting + self.late:
            if budget == 0 or not self.slots.num_free:
                break
            if not (n := prompt_tokens(request)):
                continue
            self._unqueue(request)
            request.slot = self.slots.allocate()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, n))
        return scheduled

    def add_drafts(self, scheduled: list[ScheduledRequest], draft_budgets: dict[str, TreeBudget]) -> None:
        """Room for drafted tokens, in what the step's token budget leaves, for the ``scheduled``
        requests (whose prompts the step completes) that would like their ``draft_budgets``
        (by id) verified in the same forward."""
        room = self.max_num_batched_tokens - sum(i.num_new_tokens + i.num_draft_tokens for i in scheduled)
        for item in scheduled:
            if (draft := _within_room(draft_budgets.get(item.request.request_id), room)) is not None:
                item.draft_budget = draft
                room -= draft.node_limit

    def take_hopeless(self, now: float, prefill_s: Callable[[Request], float]) -> list[Request]:
        """Waiting requests whose first token can no longer come by their TTFT deadline (now plus
        their predicted prefill is past it), taken out of the queue."""
        hopeless = self._hopeless(now, prefill_s)
        for request in hopeless:
            self.remove(request)
        return hopeless

    def demote_hopeless(self, now: float, prefill_s: Callable[[Request], float]) -> None:
        """Move the waiting requests that can no longer make their TTFT deadline (as
        ``take_hopeless``) behind every other waiting request."""
        for request in self._hopeless(now, prefill_s):
            self.waiting.remove(request)
            bisect.insort(self.late, request, key=self._order_of)

    def _hopeless(self, now: float, prefill_s: Callable[[Request], float]) -> list[Request]:
        if not self.waiting:
            return []
        # By deadline: past the longest prompt's prefill from now, none is hopeless (a long queue
        # under overload is not priced request by request every step).
        horizon = now + prefill_s(max(self.waiting, key=lambda r: r.num_tokens))
        hopeless = []
        for request in self.waiting:
            if request.ttft_deadline > horizon:
                break
            if now + prefill_s(request) > request.ttft_deadline:
                hopeless.append(request)
        return hopeless

    def remove(self, request: Request) -> None:
        """Take a finished or aborted request out and free its KV slot."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting or request in self.late:
            self._unqueue(request)
        if request.slot is not None:
            self.slots.free(request.slot)
            request.slot = None

    def _unqueue(self, request: Request) -> None:
        """Take a waiting (or late) request out of its queue."""
        (self.late if request in self.late else self.waiting).remove(request)
        self._order.pop(request.request_id)


def _within_room(wanted: TreeBudget | None, room: int) -> TreeBudget | None:
    """``wanted`` shrunk to ``room`` drafted tokens (None: none wanted, or no room)."""
    return None if wanted is None or room <= 0 else wanted.within(wanted.depth, room)
