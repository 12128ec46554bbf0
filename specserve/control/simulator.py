"""A discrete-event simulator of the engine: the real scheduler and SLO controller, with a cost
model instead of forwards and a synthetic drafter instead of models.

Each iteration runs the engine's order: the controller plans draft budgets and caps the prompt
tokens, the scheduler admits and chunks prefills, the controller plans trees below the prompts
the step completes, the synthetic drafter grows trees (asking the drafting rule after every
level), the controller selects the nodes to verify, verification samples which path the target
accepts, and the clock advances by the cost model's prediction for the drafted levels and the
target forward. The draft's cache is followed as a draft model's would be: a request's first
draft level feeds what the draft has not read (its whole prompt, unless the controller had the
draft read it, or draft from it, in its prefill step), and reading a prompt costs a draft
forward of its tokens. Only the models are simulated; every decision is made by the code that
serves.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

from tqdm import tqdm

from specserve.control.controller import SLOController
from specserve.control.cost_model import CostModel
from specserve.control.policies import PolicyName, RequestView, StepView
from specserve.control.slo import SLO
from specserve.control.workload import Outcome
from specserve.engine.request import RequestStatus
from specserve.engine.scheduler import ScheduledRequest, Scheduler
from specserve.spec.drafter import KeepGoing
from specserve.spec.tree import TokenTree, TreeBudget


@dataclass
class AcceptanceModel:
    """A synthetic drafter whose confidence the target honours.

    The best child of every node has draft probability ~ Beta with mean ``mean_confidence``;
    each further child takes a Beta share of what is left. The target picks each child with
    probability ``calibration`` x its draft probability (1.0: a perfectly calibrated drafter),
    or none of them.
    """

    mean_confidence: float = 0.45
    concentration: float = 3.0
    calibration: float = 1.0

    def _children(self, rng: random.Random, width: int) -> list[float]:
        a = self.mean_confidence * self.concentration
        b = (1.0 - self.mean_confidence) * self.concentration
        probs, left = [], 1.0
        for _ in range(width):
            p = left * rng.betavariate(a, b)
            probs.append(p)
            left -= p
        return probs

    def draft(
        self, rng: random.Random, budgets: list[TreeBudget], keep_going: KeepGoing | None
    ) -> tuple[list[TokenTree], list[int]]:
        """Beam-grown trees within ``budgets`` and the tokens each draft forward fed."""
        trees = [TokenTree() for _ in budgets]
        frontiers: list[list[int]] = [[-1] for _ in budgets]
        forwards = []
        for depth in range(1, max((b.depth for b in budgets), default=0) + 1):
            if depth > 1 and keep_going is not None and not keep_going(depth - 1, trees):
                break
            level = [i for i, b in enumerate(budgets) if b.depth >= depth and frontiers[i]]
            if not level:
                break
            forwards.append(sum(len(frontiers[i]) for i in level))
            for i in level:
                tree, width = trees[i], budgets[i].width
                children = []
                for parent in frontiers[i]:
                    for token, p in enumerate(self._children(rng, width)):
                        children.append(tree.add(token, parent, p))
                children.sort(key=lambda n: -tree.path_probs[n])
                frontiers[i] = children[:width]
        return [t.select(b.node_limit) for t, b in zip(trees, budgets)], forwards

    def verify(self, rng: random.Random, tree: TokenTree) -> list[int]:
        """The accepted path: at each node the target picks one child (or none) at random."""
        path, node = [], -1
        while True:
            u, chosen = rng.random(), None
            for child in (i for i, p in enumerate(tree.parents) if p == node):
                u -= min(tree.probs[child] * self.calibration, 1.0)
                if u < 0:
                    chosen = child
                    break
            if chosen is None:
                return path
            path.append(chosen)
            node = chosen


@dataclass
class SimRequest:
    """The fields of an engine request that the scheduler and the controller read."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    slo: SLO
    arrival_s: float
    num_output: int = 0
    num_computed_tokens: int = 0
    steps: int = 0  # decode steps
    slot: int | None = None
    status: RequestStatus = RequestStatus.WAITING
    token_times: list[float] = field(default_factory=list)
    rejected: bool = False
    draft_cached: int = 0  # tokens in the draft's cache, as a draft model's would be

    @property
    def draft_catch_up(self) -> int:
        """What the draft feeds before its first level (the engine's rule: the root and the
        output it missed, never a prompt it did not read)."""
        return max(1, min(self.num_tokens - self.draft_cached, self.num_output))

    @property
    def num_tokens(self) -> int:
        return self.prompt_tokens + self.num_output

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.prompt_tokens

    @property
    def is_decoding(self) -> bool:
        return not self.is_prefilling and self.num_tokens - self.num_computed_tokens == 1

    @property
    def ttft_deadline(self) -> float:
        return float("inf") if self.slo.ttft_ms is None else self.arrival_s + self.slo.ttft_ms / 1e3

    def outcome(self) -> Outcome:
        times = self.token_times
        ttft = times[0] - self.arrival_s if times else None
        tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
        return Outcome(self.slo, ttft, tpot, self.num_output, self.steps, self.rejected)


@dataclass
class SimConfig:
    policy: PolicyName
    max_budget: TreeBudget = field(default_factory=lambda: TreeBudget(depth=4, width=2))
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int = 4096
    on_miss: Literal["best_effort", "reject"] = "best_effort"  # as SLOConfig.on_miss
    seed: int = 0


class Simulator:
    def __init__(self, config: SimConfig, cost: CostModel, acceptance: AcceptanceModel) -> None:
        self.config = config
        self.cost = cost
        self.acceptance = acceptance
        self.controller = SLOController(config.policy, cost, config.max_num_batched_tokens)
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens)
        self.rng = random.Random(config.seed)
        self.now = 0.0
        self.iterations = 0
        self.busy_s = 0.0

    def run(self, requests: list[SimRequest], progress: bool = True) -> tuple[list[Outcome], float]:
        """Serve ``requests`` (sorted by arrival); their outcomes and the span of the run (s)."""
        pending = list(reversed(requests))
        done: list[SimRequest] = []
        with tqdm(total=len(requests), desc=self.config.policy, unit="req", disable=not progress, leave=False) as bar:
            while pending or self.scheduler.num_unfinished:
                while pending and pending[-1].arrival_s <= self.now:
                    self.scheduler.add(pending.pop())
                rejected = self._handle_hopeless()
                done += rejected
                bar.update(len(rejected))
                if not self.scheduler.num_unfinished:
                    if pending:
                        self.now = max(self.now, pending[-1].arrival_s)
                    continue
                finished = self._step()
                done += finished
                bar.update(len(finished))
        start = min((r.arrival_s for r in requests), default=0.0)
        return [r.outcome() for r in requests], self.now - start

    def _handle_hopeless(self) -> list[SimRequest]:
        """The engine's handling of waiting requests that can no longer make their TTFT: rejected
        (returned) or served after all others."""
        def prefill_s(request: SimRequest) -> float:
            return self.cost.prefill_s(request.num_tokens)

        if self.config.on_miss == "best_effort":
            self.scheduler.demote_hopeless(self.now, prefill_s)
            return []
        hopeless = self.scheduler.take_hopeless(self.now, prefill_s)
        for request in hopeless:
            request.status, request.rejected = RequestStatus.FINISHED, True
        return hopeless

    @staticmethod
    def _catch_up(request: SimRequest) -> int:
        """What the draft feeds of ``request`` before drafting (prompt included); it then holds
        all but the bonus token the step will add."""
        fed = request.num_tokens - request.draft_cached
        request.draft_cached = request.num_tokens
        return fed

    def _prompts_read(self, scheduled: list[ScheduledRequest]) -> int:
        """The prompt tokens the draft reads in this step, as the engine's draft would: whole
        prompts the step completes and the draft did not draft from, of requests that may draft
        later (wanting two tokens after the first), when the controller says so."""
        prompted = [
            item.request for item in scheduled
            if item.completes_context and item.request.is_prefilling and not item.num_draft_tokens
        ]
        decoding = any(item.request.is_decoding for item in scheduled)
        read = [r for r in prompted if r.max_tokens > 2]
        if not read or not self.controller.reads_prompts(decoding):
            return 0
        for request in read:
            request.draft_cached = request.num_tokens
        return sum(r.num_tokens for r in read)

    def _max_budget(self, request: SimRequest) -> TreeBudget:
        free = self.config.max_model_len - request.num_tokens
        return self.config.max_budget.fit(request.max_tokens - request.num_output, free)

    def _view(self, request: SimRequest) -> RequestView:
        first = request.token_times[0] if request.token_times else None
        return RequestView.of(
            request.request_id, request.num_tokens, self._max_budget(request), request.slo,
            first, request.num_output, self.now, draft_catch_up=request.draft_catch_up, max_tokens=request.max_tokens,
        )

    def _step(self) -> list[SimRequest]:
        views = {r.request_id: self._view(r) for r in self.scheduler.running if r.is_decoding}
        plan_step = self.controller.decode_step(list(views.values()), self.scheduler)
        planned = self.controller.plan(plan_step)
        prompt_cap = self.controller.prompt_cap(plan_step, planned, self.now, self.scheduler)
        scheduled = self.scheduler.schedule({i: b for i, b in zip(views, planned) if b.depth > 0}, prompt_cap)
        views.update(self.controller.plan_prompts(scheduled, self._view, self.scheduler))
        asked = [item for item in scheduled if item.num_draft_tokens > 0]
        step_tokens = sum(item.num_new_tokens for item in scheduled)
        step = StepView([views[item.request.request_id] for item in asked], step_tokens - len(asked))
        trees, forwards = self.acceptance.draft(
            self.rng,
            [item.draft_budget for item in asked],
            self.controller.drafting_rule(step),
        )
        if forwards:  # the first level feeds each request's catch-up: its root and what it missed
            forwards[0] += sum(self._catch_up(item.request) - 1 for item in asked)
        draft_cost = self.cost.at_context(step.mean_context)  # one curve for all the step's draft forwards
        step.draft_ms = sum(draft_cost.draft_ms(n) for n in forwards)
        drafted = dict(zip((i.request.request_id for i in asked), trees))
        chosen = dict(zip(drafted, self.controller.select(step, trees)))
        contexts = [item.request.num_tokens for item in scheduled]
        verified = sum(len(t) for t in chosen.values())
        elapsed_ms = step.draft_ms + self.cost.target_ms(step_tokens + verified, sum(contexts) / len(contexts))
        elapsed_ms += draft_cost.draft_ms(self._prompts_read(scheduled))
        self.now += elapsed_ms / 1e3
        self.busy_s += elapsed_ms / 1e3
        self.iterations += 1
        finished = []
        for item in scheduled:
            request = item.request
            due = item.completes_context
            request.num_computed_tokens += item.num_new_tokens
            if not due:
                continue
            tokens = 1
            tree = chosen.get(request.request_id)
            if tree is not None and len(tree):
                accepted = self.acceptance.verify(self.rng, tree)
                self.controller.observe(request.request_id, tree, accepted)
                request.num_computed_tokens += len(accepted)
                request.draft_cached += len(accepted)  # the draft fed them while drafting
                tokens += len(accepted)
            elif len(drafted.get(request.request_id, ())):  # trimmed away: was its first guess right?
                guess = self.controller.first_guess(drafted[request.request_id])
                self.controller.observe(request.request_id, guess, self.acceptance.verify(self.rng, guess))
            if request.num_output:  # the first token comes from prefill, the rest from decode steps
                request.steps += 1
            tokens = min(tokens, request.max_tokens - request.num_output)
            request.num_output += tokens
            request.token_times += [self.now] * tokens
            if request.num_output >= request.max_tokens:
                request.status = RequestStatus.FINISHED
                self.scheduler.remove(request)
                self.controller.forget(request.request_id)
                finished.append(request)
        return finished
