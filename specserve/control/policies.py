"""Speculation policies: how much each request drafts, and which drafted nodes are verified.

Every policy answers the same three questions each iteration, for the decoding requests of the
step (``StepView``): the tree budget each request drafts with (``draft_budgets``), whether the
drafter should grow the trees one more level (a ``DraftingRule``, asked where the draft runs), and
how many of each request's best nodes the target verifies (``select``). See ../shared/ARCHITECTURE.md section 3.
"""

from __future__ import annotations

import functools
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
from specserve.control.acceptance import AcceptancePredictor, calibrated_values
from specserve.control.cost_model import CorrectedCost, CostModel, StepCost
from specserve.control.slo import SLO
from specserve.control.selection import (
    RankedNodes,
    floor_counts,
    harmless_floors,
    node_layout,
    ranked_extras,
    select_nodes,
)
from specserve.spec.tree import TokenTree, TreeBudget

PolicyName = Literal["none", "fixed", "smartspec", "specserve", "adaserve", "auto"]
OFF = TreeBudget(depth=0)


@dataclass
class RequestView:
    """What the controller sees of one request that may speculate this iteration: a decoding
    one, or one whose prompt the iteration completes (drafting from its last prompt token)."""

    request_id: str
    context_len: int
    max_budget: TreeBudget  # the most it may speculate now (its own cap, room, remaining tokens)
    tpot_slo_s: float | None = None
    decode_time_s: float = 0.0  # since its first token
    num_decoded: int = 0  # output tokens after the first
    remaining_tokens: float = math.inf  # output tokens it may still emit (its max_tokens left)
    alpha_hint: float | None = None  # the drafter's own acceptance estimate for this step, if any
    # Tokens the draft feeds before its first level: the root and the request's tokens it has
    # not cached since it last drafted for it (a prompt it never saw is paid once whenever the
    # request first speculates, so it is no cost of speculating now rather than later).
    draft_catch_up: int = 1

    @classmethod
    def of(
        cls,
        request_id: str,
        context_len: int,
        max_budget: TreeBudget,
        slo: SLO,
        first_token_time: float | None,
        num_output: int,
        now: float,
        alpha_hint: float | None = None,
        draft_catch_up: int = 1,
        max_tokens: int | None = None,
    ) -> RequestView:
        """The view of a request with ``num_output`` tokens (of at most ``max_tokens``), the
        first at ``first_token_time``. Before its first token a request has no TPOT floor: the
        tokens its prefill iteration yields all come with the first."""
        no_floor = slo.tpot_ms is None or first_token_time is None
        return cls(
            request_id=request_id,
            context_len=context_len,
            max_budget=max_budget,
            tpot_slo_s=None if no_floor else slo.tpot_ms / 1e3,
            decode_time_s=0.0 if first_token_time is None else now - first_token_time,
            num_decoded=max(num_output - 1, 0),
            remaining_tokens=math.inf if max_tokens is None else max_tokens - num_output,
            alpha_hint=alpha_hint,
            draft_catch_up=draft_catch_up,
        )


@dataclass
class StepView:
    """The decoding requests of one iteration and what else shares its target forward."""

    requests: list[RequestView]
    other_tokens: int = 0  # prefill tokens in the same forward
    queued_prompt_tokens: int = 0  # prompt tokens still to prefill (``Scheduler.queued_prompt_tokens``)
    draft_ms: float = 0.0  # time already spent drafting this iteration
    mean_context: float = field(init=False)  # every cost-model query of the step needs it

    def __post_init__(self) -> None:
        contexts = [r.context_len for r in self.requests]
        self.mean_context = sum(contexts) / len(contexts) if contexts else 0.0

    def floors(self, iteration_s: float | np.ndarray) -> np.ndarray:
        """AdaServe's A(r) of every request (the last axis): the tokens this step must yield to
        keep its mean TPOT within its SLO (0 without one), for an iteration of ``iteration_s``
        seconds or for each of an array of them."""
        return self._floors_at_zero + np.asarray(iteration_s, dtype=float)[..., None] * self.floors_per_s

    @functools.cached_property
    def floors_per_s(self) -> np.ndarray:
        """How fast each request's floor grows with the iteration's seconds: 1 / its TPOT SLO (0 without one)."""
        return np.array([0.0 if r.tpot_slo_s is None else 1.0 / r.tpot_slo_s for r in self.requests])

    @functools.cached_property
    def _floors_at_zero(self) -> np.ndarray:
        return np.array([
            0.0 if r.tpot_slo_s is None else r.decode_time_s / r.tpot_slo_s - r.num_decoded for r in self.requests
        ])

    @property
    def base_tokens(self) -> int:
        """Tokens in the forward before any drafted node: prefill plus one root per request."""
        return self.other_tokens + len(self.requests)


@dataclass(frozen=True)
class PrefillPacing:
    """Caps on an iteration's prompt tokens: ``tokens`` for prompts that can wait, ``max_tokens``
    in all where a prompt that cannot wait is served (it goes before the others, see
    ``SLOController.prompt_cap``, but only as far as the decoding requests' SLOs allow); the
    iteration's predicted time without them, and how long the decoding requests will take, at
    that pace, to emit every token they may still emit."""

    tokens: int
    decode_s: float
    finish_s: float = math.inf
    max_tokens: int | None = None  # None: no cap but the step's token budget


@functools.cache
def tree_budget(depth: int, width: int) -> TreeBudget:
    """A shared (immutable) budget; a step asks for the same few shapes many times."""
    return TreeBudget(depth=depth, width=width) if depth else OFF


class StepModel:
    """What every prediction of one step shares: the cost curve at its mean context, and (made
    when first asked for) the requests' acceptance rates and speculation caps as arrays."""

    def __init__(self, step: StepView, cost: StepCost, alphas: Callable[[StepView], np.ndarray]) -> None:
        self.step = step
        self.cost = cost
        self.base_tokens = step.base_tokens
        self._alphas_of = alphas

    @functools.cached_property
    def alphas(self) -> np.ndarray:
        return np.minimum(self._alphas_of(self.step), 1.0 - 1e-9)  # so that chain_tokens needs no case for 1

    @functools.cached_property
    def depth_caps(self) -> np.ndarray:
        return np.array([r.max_budget.depth for r in self.step.requests], dtype=int)

    @functools.cached_property
    def width_caps(self) -> np.ndarray:
        return np.array([r.max_budget.width for r in self.step.requests], dtype=int)

    @functools.cached_property
    def catch_up(self) -> np.ndarray:
        return np.array([r.draft_catch_up for r in self.step.requests], dtype=int)

    @functools.cached_property
    def chain_nodes(self) -> RankedNodes:
        """Every request's chain down to its depth cap, as nodes valued at their acceptance
        (level d: alpha^d)."""
        request, first = node_layout(self.depth_caps)
        levels = np.arange(len(request)) - first + 1
        return RankedNodes(self.alphas[request] ** levels, self.depth_caps, (request, first))

    def chain_tokens(self, depths: np.ndarray) -> np.ndarray:
        """Expected tokens each request yields verifying a chain of ``depths`` (its last axis:
        the requests) at its own acceptance rate."""
        return (1.0 - self.alphas ** (depths + 1)) / (1.0 - self.alphas)

    def chain_efficiencies(self, max_depth: int, width: int = 1, decode_only: bool = False) -> np.ndarray:
        """Predicted tokens per ms for every common depth 0 .. ``max_depth``: every request drafts
        that many levels of ``width`` (within its caps) and verifies a chain of them, accepting at
        its own rate; ``decode_only``: priced without the step's prefill tokens."""
        depths = np.minimum(np.arange(max_depth + 1)[:, None], self.depth_caps)  # [depth, request]
        tokens = self.chain_tokens(depths).sum(axis=1)
        base = len(self.alphas) if decode_only else self.base_tokens
        return tokens / (self.draft_ms(depths, width) + self.cost.forward_ms_many(base, depths.sum(axis=1)))

    def draft_ms(self, depths: np.ndarray, width: int) -> np.ndarray:
        """Predicted ms of drafting ``depths`` levels (last axis: the requests; any leading axes)
        of ``width`` within each request's cap. The draft feeds each request's catch-up (root
        included) in its first forward and its level's frontier in each later one, for the
        requests that draft that deep."""
        levels = np.arange(1, int(depths.max(initial=0)) + 1)
        fed = np.where(levels[:, None] == 1, self.catch_up, np.minimum(width, self.width_caps))  # [level, request]
        forwards = ((depths[..., None, :] >= levels[:, None]) * fed).sum(axis=-1)  # [..., level]
        return self.cost.draft_ms_many(forwards).sum(axis=-1)


class DraftingRule(ABC):
    """A policy's answer to "grow the trees one more level?", asked by the drafter after each
    draft level. Plain data, so it can run where the draft runs (in the engine or on a draft
    actor); it adds the time it takes to ``seconds``."""

    seconds: float = 0.0

    def __call__(self, depth: int, trees: list[TokenTree]) -> bool:
        start = time.perf_counter()
        try:
            return self.grow(depth, trees)
        finally:
            self.seconds += time.perf_counter() - start

    @abstractmethod
    def grow(self, depth: int, trees: list[TokenTree]) -> bool:
        """After level ``depth`` with these ``trees`` (one per request of the step)."""


@dataclass
class GrowWhileEfficient(DraftingRule):
    """SpecServe's adaptive drafter: one more level only while the predicted tokens per ms rise
    (each growing request's next node is its deepest value times the mean confidence)."""

    scales: list[float]  # the predictor's calibration per depth
    confidence: float
    cost: StepCost
    base_tokens: int
    depth_caps: list[int]  # per request

    def grow(self, depth: int, trees: list[TokenTree]) -> bool:
        values = [calibrated_values(tree, self.scales) for tree in trees]
        growing = [v for v, cap in zip(values, self.depth_caps) if v and cap > depth]
        tokens = len(trees) + sum(sum(v) for v in values)
        nodes = sum(len(v) for v in values)
        more_tokens = tokens + sum(v[-1] * self.confidence for v in growing)
        now_ms = self.cost.iteration_ms(self.base_tokens, nodes, [len(trees)] * depth)
        more_ms = self.cost.iteration_ms(self.base_tokens, nodes + len(growing), [len(trees)] * (depth + 1))
        return bool(growing) and more_tokens / more_ms > tokens / now_ms


class Policy(ABC):
    name: ClassVar[PolicyName]
    needs_cost_model: ClassVar[bool] = True
    trims: ClassVar[bool] = False  # whether ``select`` may verify fewer nodes than were drafted
    speculates: ClassVar[bool] = True  # whether it ever drafts
    # Whether its decisions read ``StepView.queued_prompt_tokens`` (prompt pacing, the backlog
    # rule); for the others the engine does not count the queue.
    reads_prompt_queue: ClassVar[bool] = False

    def __init__(
        self, cost: CostModel | CorrectedCost | None, predictor: AcceptancePredictor, max_step_tokens: int
    ) -> None:
        if self.needs_cost_model and cost is None:
            raise ValueError(f"policy {self.name!r} needs a cost model")
        self.cost = cost
        self.predictor = predictor
        self.max_step_tokens = max_step_tokens
        self._step_model: StepModel | None = None

    def draft_budgets(self, step: StepView) -> list[TreeBudget]:
        return [r.max_budget for r in step.requests]

    def drafting_rule(self, step: StepView) -> DraftingRule | None:
        """The test the drafter asks after each level of this step (None: draft the whole plan)."""
        return None

    def select(self, step: StepView, nodes: RankedNodes) -> np.ndarray:
        """How many of its best nodes each request verifies, given every drafted node's value."""
        return nodes.sizes

    def prefill_pacing(self, step: StepView, budgets: list[TreeBudget]) -> PrefillPacing | None:
        """How much prompt work of requests whose first token can wait this iteration may take
        beside the decoding requests' planned ``budgets`` (None: all the step's token budget leaves)."""
        return None

    # ------------------------------------------------------------------ helpers

    def step_model(self, step: StepView) -> StepModel:
        """The step's cost curve and request arrays, computed once per step."""
        if self._step_model is None or self._step_model.step is not step:
            self._step_model = StepModel(step, self.cost.at_context(step.mean_context), self.alphas)
        return self._step_model

    def forward_ms(self, step: StepView, nodes: float) -> float:
        """The step's target forward verifying ``nodes`` drafted nodes."""
        return self.step_model(step).cost.forward_ms(step.base_tokens, nodes)

    def alphas(self, step: StepView) -> np.ndarray:
        """The per-token acceptance rate a chain plan assumes for each request: what its drafts
        achieved so far, or the drafter's hint for this step when that is higher."""
        rates = self.predictor.request_rates([r.request_id for r in step.requests])
        hints = [np.nan if r.alpha_hint is None else r.alpha_hint for r in step.requests]
        return np.fmax(np.array(rates, dtype=float), np.array(hints, dtype=float))

    def best_chain_depth(self, step: StepView, width: int = 1, decode_only: bool = False, min_gain: float = 1.0) -> int:
        """The common depth (0 .. the deepest cap) with the best predicted efficiency; 0 unless
        that is at least ``min_gain`` times not speculating's."""
        deepest = max((r.max_budget.depth for r in step.requests), default=0)
        efficiencies = self.step_model(step).chain_efficiencies(deepest, width, decode_only)
        best = int(np.argmax(efficiencies))  # the first best
        return best if efficiencies[best] >= min_gain * efficiencies[0] else 0

    def best_chain(self, step: StepView, width: int = 1) -> list[TreeBudget]:
        """Every request drafts the best common depth (within its caps)."""
        depth = self.best_chain_depth(step, width)
        return [tree_budget(min(depth, r.max_budget.depth), min(width, r.max_budget.width)) for r in step.requests]


class NoSpeculation(Policy):
    name = "none"
    needs_cost_model = False
    speculates = False

    def draft_budgets(self, step: StepView) -> list[TreeBudget]:
        return [OFF] * len(step.requests)


class FixedSpeculation(Policy):
    """Every request drafts its full budget (a chain of k or a fixed tree); all of it is verified."""

    name = "fixed"
    needs_cost_model = False


class SmartSpec(Policy):
    """One chain length k for the whole batch, maximising B(1-a^(k+1))/(1-a) / T(k)."""

    name = "smartspec"

    def alphas(self, step: StepView) -> np.ndarray:
        return np.full(len(step.requests), self.predictor.rate)  # one acceptance EMA for the whole batch

    def draft_budgets(self, step: StepView) -> list[TreeBudget]:
        return self.best_chain(step)


class SpecServe(Policy):
    """SpecServe/AdaSpec: an adaptive drafter and a confidence-prior verifier, on chains.

    Speculate only if one drafted token beats none; after each draft level, go on only while
    the predicted efficiency of one more level (next confidence extrapolated with the running
    mean) is higher; then drop the least confident tail tokens of all requests while that does
    not lower the predicted efficiency, which gives every request its own length.
    """

    name = "specserve"
    trims = True

    def draft_budgets(self, step: StepView) -> list[TreeBudget]:
        none, one = self.step_model(step).chain_efficiencies(1)
        if one <= none:
            return [OFF] * len(step.requests)
        return [TreeBudget(depth=r.max_budget.depth) for r in step.requests]

    def drafting_rule(self, step: StepView) -> GrowWhileEfficient:
        caps = [r.max_budget.depth for r in step.requests]
        return GrowWhileEfficient(
            scales=self.predictor.scales(max(caps, default=0)),
            confidence=self.predictor.mean_confidence,
            cost=self.step_model(step).cost,
            base_tokens=step.base_tokens,
            depth_caps=caps,
        )

    def select(self, step: StepView, nodes: RankedNodes) -> np.ndarray:
        tails = np.argsort(nodes.values, kind="stable")  # least confident first (ties: earlier request)
        total = len(tails)
        # Expected tokens and predicted ms after dropping the first k tails, for every k at once.
        tokens = nodes.expected_tokens(nodes.sizes) - np.concatenate(([0.0], np.cumsum(nodes.values[tails])))
        ms = step.draft_ms + self.step_model(step).cost.forward_ms_many(step.base_tokens, total - np.arange(total + 1))
        efficiency = tokens / ms
        falls = np.flatnonzero(efficiency[1:] < efficiency[:-1])  # dropping one more would lower it
        dropped = int(falls[0]) if len(falls) else total
        return nodes.sizes - nodes.per_request(tails[:dropped])


class AdaServe(Policy):
    """AdaServe: a token budget from the tightest TPOT SLO, tree shape from load, then SLO floors
    first and the globally best nodes with what is left."""

    name = "adaserve"
    trims = True

    def token_budget(self, step: StepView) -> int:
        """Most drafted nodes such that the iteration, spread over the tokens each request is
        expected to gain (its share of nodes, each accepted at the running rate), stays within
        the tightest TPOT SLO of the batch."""
        room = max(self.max_step_tokens - step.base_tokens, 0)
        slos = [r.tpot_slo_s for r in step.requests if r.tpot_slo_s is not None]
        if not slos or not step.requests:
            return room
        limit_ms, alpha, n = min(slos) * 1e3, self.predictor.rate, len(step.requests)
        fits = [
            nodes for nodes in range(0, room + 1, n)
            if step.draft_ms + self.forward_ms(step, nodes) <= limit_ms * (1 + alpha * nodes / n)
        ]
        return fits[-1] if fits else 0

    def draft_budgets(self, step: StepView) -> list[TreeBudget]:
        share = self.token_budget(step) // max(len(step.requests), 1)
        if share == 0:
            return [OFF] * len(step.requests)
        budgets = []
        for r in step.requests:
            depth = min(r.max_budget.depth, share)
            width = min(r.max_budget.width, max(1, -(-2 * share // max(depth, 1))))
            budgets.append(TreeBudget(depth=depth, width=width) if depth else OFF)
        return budgets

    def select(self, step: StepView, nodes: RankedNodes) -> np.ndarray:
        budget = self.token_budget(step)
        iteration_s = (step.draft_ms + self.forward_ms(step, budget)) / 1e3
        return select_nodes(nodes, step.floors(iteration_s), budget)


class AutoSpeculation(Policy):
    """SpecServe's own: speculate as deep as predicted goodput pays, and deeper where that puts a
    request behind its SLO back on track without putting behind anyone else.

    Drafting: the common depth with the best predicted tokens per ms (per-request acceptance,
    draft cost included); requests behind their SLO whose floors are worth serving (see
    ``harmless_floors``) draft a chain deep enough for them at their acceptance rates; nothing is
    drafted when speculation loses and nobody is behind. Verification: those floors first, then
    the globally best nodes as long as each one raises the predicted tokens per ms of the
    iteration. A floor that would cost others their SLO is not served: under overload, lifting
    every request behind at the expense of the rest makes iterations long and everybody late.
    Prompts are paced the same way: an iteration takes only as many prompt tokens as keep every
    decoding request that is on track on track, and of prompts that can wait no more than
    stretch it by half its time without them; prompts that such chunks could not prefill before
    the decoding requests finish wait for them to finish, where their deadlines allow
    (``PrefillPacing.finish_s``). A prompt whose TTFT deadline is near goes first, but not past
    what keeps the decoding requests on track: under overload one prompt more on time at the
    cost of several answers late loses, and a prompt that can no longer make its deadline is
    served after the others (``Scheduler.demote_hopeless``).

    Speculation for goodput is priced as in a decode-only iteration: prompt chunks in the same
    forward are work that must be done anyway, and counting their time would make drafted nodes
    look cheap beside it, so that speculation would take time from waiting prompts under load.
    Behind a backlog of prompts (more than ``backlog_steps`` full steps of them queued), while
    every decoding request would stay on track through a full step without speculation, there is
    no speculation for goodput: it would only take room and time from the prompts.
    """

    name = "auto"
    trims = True
    reads_prompt_queue = True
    # Speculating for goodput must be predicted to beat plain decoding by this factor: the cost
    # model errs by some per cent on a step, and a step wrongly thought to pay costs everyone in it.
    min_gain: ClassVar[float] = 1.05
    # How long a paced iteration may take, as a multiple of the same iteration without prompts.
    # Prompts that wait shorten the decoding requests' iterations even when the floors would let
    # them absorb more: slack spent on one prompt is gone when the next one comes. In simulation
    # of this CPU serving the replay's prompts, 1.5 cut mean TPOT at light load by 14 % and raised
    # attainment by 3-6 points at moderate load over the floors alone; 1.25 delayed prompts on
    # the GPU profiles (mean TTFT 1.7-2.9x at light load) for little more, and 1.0 (decode
    # first) lost attainment there.
    paced_stretch: ClassVar[float] = 1.5
    # Where first tokens are what is short, speculating for goodput slows the prefills that make
    # them: simulated on the H100-graphs profile at 48 and 64 req/s, auto met 4 and 6 points fewer
    # SLOs than `none` with it. Four steps: fewer cost this CPU's light load a little TPOT (a
    # burst of two prompts is a backlog of one step).
    backlog_steps: ClassVar[int] = 4

    def draft_budgets(self, step: StepView) -> list[TreeBudget]:
        model = self.step_model(step)
        width = int(model.width_caps.max())
        cost = model.cost
        if self._behind_a_prompt_backlog(step, cost):
            goodput = np.zeros(len(step.requests), dtype=int)
        else:
            goodput = np.minimum(self.best_chain_depth(step, width, True, self.min_gain), model.depth_caps)

        def iteration_s(depths: np.ndarray) -> np.ndarray:  # each request drafts and verifies a chain this deep
            depths = np.maximum(depths, goodput)  # (or goodput's depth)
            return (model.draft_ms(depths, width) + cost.forward_ms_many(step.base_tokens, depths.sum(axis=-1))) / 1e3

        chains = model.chain_nodes
        depths = np.maximum(goodput, chains.needed(harmless_floors(chains, step.floors, iteration_s)))
        return [tree_budget(d, w) for d, w in zip(depths.tolist(), model.width_caps.tolist())]

    def _behind_a_prompt_backlog(self, step: StepView, cost: StepCost) -> bool:
        """More than ``backlog_steps`` full steps of prompts queued, and no decoding request that
        a full step without speculation would put behind its SLO."""
        if step.queued_prompt_tokens <= self.backlog_steps * self.max_step_tokens:
            return False
        return bool((step.floors(cost.target_ms(self.max_step_tokens) / 1e3) <= 1.0).all())

    def select(self, step: StepView, nodes: RankedNodes) -> np.ndarray:
        room = max(self.max_step_tokens - step.base_tokens, 0)
        cost = self.step_model(step).cost

        def iteration_s(counts: np.ndarray) -> np.ndarray:
            return (step.draft_ms + cost.forward_ms_many(step.base_tokens, counts.sum(axis=-1))) / 1e3

        counts = floor_counts(nodes, harmless_floors(nodes, step.floors, iteration_s), room)
        extras = ranked_extras(nodes, counts)[: room - int(counts.sum())]
        # Expected tokens and predicted decode-only ms after adding the best k extras, for every k at once.
        gains = nodes.expected_tokens(counts) + np.concatenate(([0.0], np.cumsum(nodes.values[extras])))
        added = counts.sum() + np.arange(len(extras) + 1)
        efficiency = gains / (step.draft_ms + cost.forward_ms_many(len(step.requests), added))
        best = int(np.argmax(efficiency))  # the first maximum: fewest nodes on ties
        return counts + nodes.per_request(extras[: best if efficiency[best] >= self.min_gain * efficiency[0] else 0])

    def prefill_pacing(self, step: StepView, budgets: list[TreeBudget]) -> PrefillPacing | None:
        if not step.requests:
            return None
        model = self.step_model(step)
        depths = np.array([b.depth for b in budgets])
        nodes = sum(b.node_limit for b in budgets)
        curve = model.cost.verify_ms if nodes else model.cost.target_ms
        prompt = np.arange(self.max_step_tokens + 1)
        width = int(model.width_caps.max())
        forward_ms = np.maximum.accumulate(curve.many(len(step.requests) + nodes + prompt))  # monotone for the search
        iteration_s = (model.draft_ms(depths, width) + forward_ms) / 1e3
        # The iteration time at which each request's floor reaches what it is expected to yield
        # (the floor grows linearly with it; a request without a TPOT SLO has none).
        per_s = step.floors_per_s
        yields = model.chain_tokens(depths)
        with np.errstate(divide="ignore"):
            limits = np.where(per_s > 0, (yields - step.floors(0.0)) / per_s, np.inf)
        on_track = limits >= iteration_s[0]
        if not on_track.any():
            return None
        floors_s = limits[on_track].min()
        room, max_room = np.searchsorted(iteration_s, [min(floors_s, self.paced_stretch * iteration_s[0]), floors_s],
                                         side="right") - 1
        iterations_left = (np.array([r.remaining_tokens for r in step.requests]) / yields).max()
        return PrefillPacing(int(room), float(iteration_s[0]), float(iterations_left * iteration_s[0]), int(max_room))


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (NoSpeculation, FixedSpeculation, SmartSpec, SpecServe, AdaServe, AutoSpeculation)
}


def build_policy(
    name: PolicyName, cost: CostModel | CorrectedCost | None, predictor: AcceptancePredictor, max_step_tokens: int
) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown speculation policy {name!r}; known: {sorted(POLICIES)}")
    return POLICIES[name](cost, predictor, max_step_tokens)
