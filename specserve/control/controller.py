"""The central SLO controller: one policy, one acceptance predictor, one cost model.

The engine (or the simulator) asks it six things every iteration, in this order: the draft
budgets of the decoding requests (``plan``), how many prompt tokens may join them
(``prompt_cap``), once the step is scheduled the draft budgets of the requests whose prompts
it completes (``plan_prompts``), the rule the drafter asks after each level whether to
grow the trees one more (``drafting_rule``), which drafted nodes to verify (``select``), and
whether the draft reads the prompts the step completes (``reads_prompts``); after
verification it reports what was accepted (``observe``, also for the ``first_guess`` of a tree
of which nothing was verified) and how long drafting and the target forward took
(``observe_draft``, ``observe_forward``). The controller times its own decisions, so
their overhead relative to the iteration can be measured.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from specserve.control.acceptance import AcceptancePredictor
from specserve.control.cost_model import CorrectedCost, CostModel
from specserve.control.policies import DraftingRule, PolicyName, RequestView, StepView, build_policy
from specserve.control.step_trees import StepTrees
from specserve.engine.scheduler import PromptCap, ScheduledRequest, Scheduler
from specserve.spec.tree import TokenTree, TreeBudget

T = TypeVar("T")

# How many times the predicted prefill of the whole prompt queue a paced prompt's TTFT deadline
# must leave: the margin covers the cost model's error and later arrivals with earlier deadlines,
# which go first. Counting only the queue ahead of a prompt (in serving order), 2 lost TTFT under
# overload in simulation (2x this CPU's capacity); over the whole queue, and with prompts held
# until the decoding requests finish, 2 met as many TTFT targets as 3 there and more TPOT ones.
TTFT_MARGIN = 2.0


class SLOController:
    def __init__(self, policy: PolicyName, cost: CostModel | None, max_step_tokens: int) -> None:
        self.predictor = AcceptancePredictor()
        self.cost = None if cost is None else CorrectedCost(cost)
        self.policy = build_policy(policy, self.cost, self.predictor, max_step_tokens)
        self.decision_seconds = 0.0  # spent in plan / prompt cap / drafting rule / select / observe
        self._rule: DraftingRule | None = None

    def _timed(self, decide: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            return decide()
        finally:
            self.decision_seconds += time.perf_counter() - start

    def decode_step(self, requests: list[RequestView], scheduler: Scheduler) -> StepView:
        """The view of an iteration's decoding ``requests``, with the prompt tokens queued in
        ``scheduler`` where the policy reads them (counting them walks the queue)."""
        queued = scheduler.queued_prompt_tokens if self.policy.reads_prompt_queue else 0
        return StepView(requests, queued_prompt_tokens=queued)

    def plan(self, step: StepView) -> list[TreeBudget]:
        """Each decoding request's draft budget for this iteration (within its own cap); the
        evidence of those that are not to speculate ages (``AcceptancePredictor.skip``)."""
        if not step.requests:
            return []

        def decide() -> list[TreeBudget]:
            budgets = self.policy.draft_budgets(step)
            for budget, request in zip(budgets, step.requests):
                if budget.depth == 0:
                    self.predictor.skip(request.request_id)
            return [b.within(r.max_budget.depth, r.max_budget.node_limit) for b, r in zip(budgets, step.requests)]

        return self._timed(decide)

    def prompt_cap(
        self, step: StepView, budgets: list[TreeBudget], now: float, scheduler: Scheduler
    ) -> PromptCap | None:
        """The policy's cap on this iteration's prompt tokens beside the planned ``budgets``
        (None: no cap, or no prompt pending in ``scheduler``). A prompt waits only while its TTFT
        deadline leaves ``TTFT_MARGIN`` times the predicted time to prefill every prompt token
        queued (``step.queued_prompt_tokens``: of requests not yet late), in steps of the step
        budget beside decodes like this step's: a long queue, as under overload, leaves none waiting. Those that cannot wait
        still take no more than keeps the decoding requests on track (``PrefillPacing.max_tokens``).

        When the capped chunks cannot prefill the queue before the decoding requests have
        emitted every token they may still emit, they would only lengthen those requests'
        iterations until the prompts had to go whole anyway: then a prompt whose deadline also
        leaves that time takes no tokens, and goes on when they are done."""
        if not scheduler.has_prompts:
            return None
        pacing = self._timed(lambda: self.policy.prefill_pacing(step, budgets))
        if pacing is None:
            return None
        queued_tokens = step.queued_prompt_tokens
        steps = -(-queued_tokens // self.policy.max_step_tokens)
        prefill_s = self.cost.prefill_s(queued_tokens) + steps * pacing.decode_s
        waits = now + TTFT_MARGIN * prefill_s
        trickles = queued_tokens * pacing.decode_s <= pacing.tokens * pacing.finish_s
        holds = waits + pacing.finish_s if math.isfinite(pacing.finish_s) and not trickles else math.inf
        return PromptCap(pacing.tokens, waits, holds, pacing.max_tokens)

    def plan_prompts(
        self, scheduled: list[ScheduledRequest], view: Callable[[Any], RequestView], scheduler: Scheduler
    ) -> dict[str, RequestView]:
        """Draft budgets, and room in the ``scheduled`` step (``scheduler.add_drafts``), for the
        requests whose prompts it completes: their trees hang below the last prompt token and the
        prefill forward verifies them, so that a short answer may come whole with its first
        token. Planned as decoding requests' are (without a TPOT floor yet: goodput alone
        decides), beside the step's other prompt tokens, and only where the draft reads those
        prompts anyway (``reads_prompts``). Returns the planned requests' views (by id), made
        with ``view`` of a request (the engine's, or the simulator's)."""
        completing = [item.request for item in scheduled if item.completes_context and item.request.is_prefilling]
        if not completing or not self.reads_prompts(any(item.request.is_decoding for item in scheduled)):
            return {}
        views = {r.request_id: view(r) for r in completing}
        other_tokens = sum(item.num_new_tokens for item in scheduled) - len(completing)
        budgets = self.plan(StepView(list(views.values()), other_tokens))
        scheduler.add_drafts(scheduled, {i: b for i, b in zip(views, budgets) if b.depth > 0})
        return views

    def reads_prompts(self, decoding: bool) -> bool:
        """Whether the draft reads the prompts a step prefills, with ``decoding`` requests in it
        or none: only when the policy speculates and nothing else decodes. The draft pass then
        counts in the new requests' TTFT instead of in their first decode step, and delays
        nobody. Beside decoding requests a draft that reads every prompt does work that a request
        which never speculates (under load) would not need: in simulation that lost 3.6 points
        at the A100 profile's highest load and 11.6 at the H100 profile's 48 req/s, where reading
        only in idle steps lost nothing and still gained the low loads' TPOT.
        """
        return self.policy.speculates and not decoding

    def drafting_rule(self, step: StepView) -> DraftingRule | None:
        """What the drafter asks after each level of this step (its time counts on ``select``)."""
        self._rule = self._timed(lambda: self.policy.drafting_rule(step))
        return self._rule

    def select(self, step: StepView, trees: list[TokenTree]) -> list[TokenTree]:
        """The subtree of each drafted tree that the target verifies."""
        if self._rule is not None:  # asked in this process (a draft actor asks its own copy)
            self.decision_seconds += self._rule.seconds
            self._rule = None
        if not trees or not self.policy.trims:
            return trees

        def decide() -> list[TokenTree]:
            drafted = StepTrees(trees, self.predictor.scales)
            return drafted.cut(self.policy.select(step, drafted.ranked))

        return self._timed(decide)

    def first_guess(self, tree: TokenTree) -> TokenTree:
        """The most valuable node (always at depth 1) of a drafted tree of which nothing was
        verified. The token the target chooses without it tells whether it would have been
        accepted; observing that keeps the acceptance rates from counting only the trees that
        were worth verifying, which would make every plan too hopeful."""
        return self._timed(lambda: tree.select(1, self.predictor.values(tree)))

    def observe(self, request_id: str, tree: TokenTree, accepted_nodes: list[int]) -> None:
        self._timed(lambda: self.predictor.observe(request_id, tree, accepted_nodes))

    def observe_forward(self, tokens: int, context: float, seconds: float, verified: bool = False) -> None:
        """A step's measured target forward with sampling or (``verified``) verifying its
        output, which corrects the cost model online."""
        if self.cost is not None:
            self._timed(lambda: self.cost.observe_forward(tokens, context, seconds, verified))

    def observe_draft(self, forwards: Sequence[int], context: float, seconds: float) -> None:
        """Drafting with a draft forward of each of ``forwards`` tokens at mean ``context`` took
        ``seconds``, which corrects the predicted drafting time online."""
        if self.cost is not None and forwards:
            self._timed(lambda: self.cost.observe_draft(forwards, context, seconds))

    def forget(self, request_id: str) -> None:
        self.predictor.forget(request_id)
