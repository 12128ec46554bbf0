"""The synchronous engine: add requests, call ``step()``, read outputs.

One step flows in one direction: reject the hopeless (if configured) -> the SLO controller plans
each decoding request's draft budget (a request whose structured output forces its next tokens
drafts those instead) -> schedule -> the controller plans the trees of the requests whose
prompts the step completes (drafted below the last prompt token, in steps where nothing else
decodes) -> draft token trees -> the controller selects the nodes to verify -> build sequence
slices -> one target forward -> score prompt tokens (for requests that asked for prompt
log-probabilities) -> sample or verify, where constraints allow (the controller learns from the
outcome) -> keep the target's features of the cached positions for the next DraftRequest (EAGLE
heads only) -> the draft reads the prompts it did not draft from (in steps where nothing else
decodes) -> append tokens, advance constraints, detokenize, check stops -> report outputs and
free finished requests' slots.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from specserve.config import EngineConfig
from specserve.control.controller import SLOController
from specserve.control.cost_model import CostModel, profile_path
from specserve.control.policies import OFF, POLICIES, RequestView, StepView
from specserve.control.profiler import profile_forward
from specserve.engine.detokenizer import IncrementalDetokenizer
from specserve.engine.executor import ModelExecutor
from specserve.engine.inputs import InputProcessor, Prompt
from specserve.engine.request import FinishReason, Request, RequestOutput
from specserve.engine.sampler import sample, top_logprobs
from specserve.engine.sampling_params import SamplingParams
from specserve.engine.scheduler import PromptCap, ScheduledRequest, Scheduler
from specserve.engine.structured import Grammars
from specserve.models.default_model import default_model_dir
from specserve.models.forward_batch import SequenceSlice
from specserve.models.linear_kernel import cpu_kernel_environment
from specserve.models.loader import ModelFiles
from specserve.spec.build import build_drafter
from specserve.spec.draft_model import ModelDrafter
from specserve.spec.drafter import Drafter, DraftRequest
from specserve.spec.hybrid import HybridDrafter
from specserve.spec.remote_drafter import RemoteDrafter
from specserve.spec.stats import SpecStats
from specserve.spec.tree import MAX_DEPTH, TokenTree, TreeBudget
from specserve.spec.verifier import verify

logger = logging.getLogger(__name__)

class Pick(NamedTuple):
    """A due request's new tokens in one step."""

    tokens: list[int]
    logprobs: list[dict[int, float] | None]
    rows: list[int]  # the request's logits row each token was picked from (0: its first)


@dataclass(frozen=True)
class EngineLoad:
    """A snapshot of an engine's load: the signals serving and autoscaling act on."""

    waiting: int  # requests not yet admitted
    running: int  # requests holding a KV slot
    kv_usage: float  # share of KV slots in use
    on_track: float  # share of unfinished requests that can still meet their SLO


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        model_path = ModelFiles.check(self.config.model or default_model_dir()).path
        self.executor = ModelExecutor(self.config, model_path)
        self.inputs = InputProcessor(self.config, model_path, self.executor.runner.model.arch.vocab_size,
                                     self.executor.max_model_len)
        # The processor's, under the names the engine's callers know.
        self.model_path, self.tokenizer = model_path, self.inputs.tokenizer
        self.eos_token_ids = self.inputs.eos_token_ids
        self.vocab_size, self.max_model_len = self.inputs.vocab_size, self.inputs.max_model_len
        self.apply_chat_template, self.encode = self.inputs.apply_chat_template, self.inputs.encode
        self.grammars = Grammars(self.tokenizer)
        self.scheduler = Scheduler(self.config.max_num_seqs, self.config.max_num_batched_tokens)
        self.drafter: Drafter | None = None
        self.controller: SLOController | None = None
        if self.config.speculative is not None:
            self.drafter = build_drafter(self.config, self.vocab_size, self.max_model_len)
            self.controller = self._build_controller()
        self.spec_stats = SpecStats()
        self.requests: dict[str, Request] = {}
        # The target's features of positions cached since a request's last DraftRequest (EAGLE).
        self._target_features: dict[str, list[torch.Tensor]] = {}
        self._seed_rng = random.Random(self.config.seed)

    # ----------------------------------------------------------------- requests

    def make_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> Request:
        """Tokenize and validate; raises ValueError with a clear message on bad input."""
        token_ids = self.inputs.prompt_ids(prompt, params)
        slo = self.config.control.slo.resolve(params.slo_class, params.tpot_slo_ms, params.ttft_slo_ms)
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        generator = None if params.greedy else torch.Generator().manual_seed(seed)
        detokenizer = IncrementalDetokenizer(
            self.tokenizer, token_ids, params.stop, params.include_stop_str_in_output
        )
        constraint = self.grammars.constraint(params.structured) if params.structured is not None else None
        return Request(request_id, token_ids, params, detokenizer, generator, arrival_time, slo, constraint)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.scheduler.add(request)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its KV slot; returns its final output (None if unknown)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        request.finish(FinishReason.ABORT)
        self._retire(request)
        return request.take_output()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def load(self) -> EngineLoad:
        """How busy the engine is (safe to call from another thread: it only reads)."""
        waiting = list(self.scheduler.waiting) + list(self.scheduler.late)
        running = list(self.scheduler.running)
        now = time.monotonic()
        unfinished = waiting + running
        on_track = sum(r.on_track(now) for r in unfinished)
        return EngineLoad(
            waiting=len(waiting),
            running=len(running),
            kv_usage=len(running) / self.config.max_num_seqs,
            on_track=on_track / len(unfinished) if unfinished else 1.0,
        )

    # -------------------------------------------------------------------- steps

    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns outputs of requests that advanced (unless they want only
        their final output) or finished.

        Failures stay as small as they can: a plan that fails makes the step decode without
        speculation; a failed forward, or a failure while picking the batch's tokens, fails the
        requests of the step (never the waiting ones, never the engine); a failure while one
        request takes its tokens (its structured output, say) fails that request alone.
        """
        outputs = self._handle_hopeless()
        views, budgets, prompt_cap = self._plan_or_nothing()
        forced = self._forced_tokens()
        budgets.update({request_id: TreeBudget(depth=len(tokens)) for request_id, tokens in forced.items()})
        scheduled = self.scheduler.schedule(budgets, prompt_cap)
        if not scheduled:
            return outputs
        if self.controller is not None and not self.drafter.needs_target_features:
            self._plan_prompt_trees(scheduled, views)
        now = time.monotonic()
        for item in scheduled:
            if item.request.metrics.first_scheduled_time is None:
                item.request.metrics.first_scheduled_time = now
        try:
            due, scored, picks = self._run_batch(scheduled, views, forced)
        except Exception as exc:  # a failed step fails its batch, never the engine
            logger.exception("step failed")
            return outputs + [self._fail(item.request, f"step failed: {exc}") for item in scheduled]
        now = time.monotonic()
        for request in scored:  # max_tokens 0: done once the prompt is read
            request.metrics.first_token_time = now
            request.finish(FinishReason.LENGTH)
            outputs.append(request.take_output())
            self._retire(request)
        for request, pick in zip(due, picks):
            try:
                for token, token_logprobs in zip(pick.tokens, pick.logprobs):
                    self._append_token(request, token, now, token_logprobs)
                    if request.finished:
                        break
            except Exception as exc:
                logger.exception("request %s failed to take its tokens", request.request_id)
                outputs.append(self._fail(request, f"request failed: {exc}"))
                continue
            if request.finished or request.params.output_kind == "cumulative":
                outputs.append(request.take_output())
            if request.finished:
                self._retire(request)
        return outputs

    def _plan_or_nothing(self) -> tuple[dict[str, RequestView], dict[str, TreeBudget], PromptCap | None]:
        """The controller's plan (``_plan``); none, so that the step decodes without speculation
        or prompt pacing, when there is no controller or planning fails."""
        if self.controller is None:
            return {}, {}, None
        try:
            return self._plan()
        except Exception:  # speculation only saves time: a step without it is still right
            logger.exception("speculation planning failed; this step decodes without it")
            return {}, {}, None

    def _run_batch(
        self, scheduled: list[ScheduledRequest], views: dict[str, RequestView], forced: dict[str, list[int]]
    ) -> tuple[list[Request], list[Request], list[Pick]]:
        """Draft, run the forward and pick the new tokens: the requests due a token and their
        picks, and the requests that only scored their prompt (``max_tokens`` 0)."""
        features_wanted = self.drafter is not None and self.drafter.needs_target_features
        trees, guesses = self._draft(scheduled, views, forced)
        start = time.perf_counter()
        slices = [self._slice(item, trees.get(item.request.request_id)) for item in scheduled]
        if features_wanted:
            logits, hidden = self.executor.call("forward_with_hidden", slices)
        else:
            logits = self.executor.call("forward", slices, None, False)  # logits stay on the device
        verify_time = time.perf_counter() - start
        if any(item.num_prompt_logits for item in scheduled):
            logits = self._score_prompts(scheduled, logits, trees)
        due = [item.request for item in scheduled if item.samples]
        scored = [item.request for item in scheduled if item.completes_context and not item.samples]
        # Their first token comes from this step; the draft read those it drafted from.
        prompted = [i.request for i in scheduled if i.samples and i.request.is_prefilling and not i.num_draft_tokens]
        decoding = any(r.is_decoding for r in due)
        for item in scheduled:
            item.request.num_computed_tokens += item.num_new_tokens
        picks = self._next_tokens(due, logits, trees, verify_time, forced)
        if self.controller is not None:
            fed = sum(item.num_new_tokens for item in scheduled) + sum(len(t) for t in trees.values())
            context = sum(item.request.num_tokens for item in scheduled) / len(scheduled)
            self.controller.observe_forward(fed, context, time.perf_counter() - start, verified=bool(trees))
        if guesses:
            self._score_guesses(due, picks, guesses)
        if features_wanted:
            self._keep_target_features(scheduled, hidden, trees, dict(zip((r.request_id for r in due), picks)))
        if prompted and self.drafter is not None and self.controller.reads_prompts(decoding):
            self._read_prompts(prompted)
        return due, scored, picks

    def _next_tokens(
        self,
        due: list[Request],
        logits: torch.Tensor,
        trees: dict[str, TokenTree],
        verify_time: float,
        forced: dict[str, list[int]],
    ) -> list[Pick]:
        """Each due request's new tokens (and logprobs): sampled, or verified from its tree."""
        rows = logits.split([len(trees.get(r.request_id, ())) + 1 for r in due])
        picks: list[Pick] = [Pick([], [], [])] * len(due)
        plain = [i for i, r in enumerate(due) if r.request_id not in trees]
        if plain:
            # Without trees every row is plain, in order: no copy of the batch's logits.
            plain_logits = logits if not trees else torch.cat([rows[i] for i in plain])
            requests = [due[i] for i in plain]
            tokens = sample(plain_logits, [r.params for r in requests], [r.generator for r in requests],
                            [(r.prompt_token_ids, r.output_token_ids) for r in requests],
                            self._allowed(requests, plain_logits.shape[-1]))
            logprobs = self._logprobs(plain_logits, tokens, requests)
            for i, token, token_logprobs in zip(plain, tokens, logprobs):
                picks[i] = Pick([token], [token_logprobs], [0])
        speculated = [i for i, r in enumerate(due) if r.request_id in trees]
        if speculated:
            verified = self._verify(
                [due[i] for i in speculated], [rows[i] for i in speculated], trees, verify_time, forced
            )
            for i, pick in zip(speculated, verified):
                picks[i] = pick
        return picks

    def _score_prompts(
        self, scheduled: list[ScheduledRequest], logits: torch.Tensor, trees: dict[str, TokenTree]
    ) -> torch.Tensor:
        """Record the prompt log-probabilities of the rows that score prompt tokens (before the
        requests' computed counts advance); returns the other rows, those tokens are picked from."""
        sizes = []
        for item in scheduled:
            picked = 1 + len(trees.get(item.request.request_id, ())) if item.samples else 0
            sizes += [item.num_prompt_logits, picked]
        parts = logits.split(sizes)
        for item, scores in zip(scheduled, parts[0::2]):
            if len(scores):
                request = item.request
                start = request.num_computed_tokens + 1  # the first prompt token these rows predict
                tokens = request.prompt_token_ids[start : start + len(scores)]
                counts = [request.params.prompt_logprobs] * len(tokens)
                request.prompt_logprobs.extend(top_logprobs(scores, tokens, counts))
        return torch.cat(parts[1::2])

    @staticmethod
    def _allowed(requests: list[Request], vocab: int) -> torch.Tensor | None:
        """[B, vocab] bool: the next tokens each request's structured output allows (all, for a
        request without one); None when no request has one."""
        constrained = [i for i, r in enumerate(requests) if r.constraint is not None]
        if not constrained:
            return None
        allowed = torch.ones(len(requests), vocab, dtype=torch.bool)
        for i in constrained:
            allowed[i] = requests[i].constraint.allowed([[]], vocab)[0]
        return allowed

    # --------------------------------------------------------------- speculation

    def _speculation_cap(self, request: Request) -> TreeBudget:
        """The most the request may ever draft: its own budget, or the config's."""
        return request.params.speculation or self.config.speculative.budget

    def _may_draft(self, request: Request) -> bool:
        return self._speculation_cap(request).depth > 0

    def _max_budget(self, request: Request) -> TreeBudget:
        """The most the request may draft this step: its cap, shrunk to its remaining tokens
        and free KV positions."""
        remaining = request.params.max_tokens - len(request.output_token_ids)
        return self._speculation_cap(request).fit(remaining, self.max_model_len - request.num_tokens)

    def _view(self, request: Request, now: float) -> RequestView:
        hints = self.drafter is not None and self.drafter.gives_acceptance_hints
        hint = self.drafter.acceptance_hint(request.request_id, request.all_token_ids) if hints else None
        # What the draft has not cached, but never the prompt (see RequestView.draft_catch_up).
        pending = self.drafter.pending(request.request_id, request.num_tokens) if self.drafter else 1
        catch_up = max(1, min(pending, len(request.output_token_ids)))
        return RequestView.of(
            request.request_id,
            request.num_tokens,
            self._max_budget(request),
            request.slo,
            request.metrics.first_token_time,
            len(request.output_token_ids),
            now,
            hint,
            catch_up,
            request.params.max_tokens,
        )

    def _plan(self) -> tuple[dict[str, RequestView], dict[str, TreeBudget], PromptCap | None]:
        """The controller's view of every decoding request, the draft budgets of those that are
        to speculate, and the cap on the step's prompt tokens."""
        now = time.monotonic()
        views = {r.request_id: self._view(r, now) for r in self.scheduler.running if r.is_decoding}
        step = self.controller.decode_step(list(views.values()), self.scheduler)
        budgets = self.controller.plan(step)
        prompt_cap = self.controller.prompt_cap(step, budgets, now, self.scheduler)
        return views, {i: b for i, b in zip(views, budgets) if b.depth > 0}, prompt_cap

    def _plan_prompt_trees(self, scheduled: list[ScheduledRequest], views: dict[str, RequestView]) -> None:
        """Room, and views in ``views``, for the trees that the requests whose prompts this step
        completes draft below their last prompt token (``SLOController.plan_prompts``). Not for
        an EAGLE draft: it would draft from the target's features of the prompt, which this
        step's forward computes. A plan that fails leaves the step as scheduled."""
        now = time.monotonic()
        try:
            views.update(self.controller.plan_prompts(scheduled, lambda r: self._view(r, now), self.scheduler))
        except Exception:
            logger.exception("planning the prompts' trees failed; this step prefills them without")

    def _forced_tokens(self) -> dict[str, list[int]]:
        """For each decoding request whose structured output forces its next tokens (and that
        does not refuse speculation), those tokens, as many as it may still emit: a draft the
        target accepts for sure, verified like any other."""
        forced = {}
        for request in self.scheduler.running:
            if request.constraint is None or not request.is_decoding:
                continue
            if request.params.speculation is not None and request.params.speculation.depth == 0:
                continue
            if tokens := request.constraint.forced()[:MAX_DEPTH]:
                remaining = request.params.max_tokens - len(request.output_token_ids)
                budget = TreeBudget(depth=len(tokens)).fit(remaining, self.max_model_len - request.num_tokens)
                if budget.depth > 0:
                    forced[request.request_id] = tokens[: budget.depth]
        return forced

    def _draft(
        self, scheduled: list[ScheduledRequest], views: dict[str, RequestView], forced: dict[str, list[int]]
    ) -> tuple[dict[str, TokenTree], dict[str, TokenTree]]:
        """Token trees for the requests that reserved room for drafts: the forced tokens of a
        constrained request, or the drafter's trees as the controller trims them; and the first
        guess of each request whose tree was trimmed away."""
        trees: dict[str, TokenTree] = {}
        asked = []
        for item in scheduled:
            if item.num_draft_tokens == 0:
                continue
            request_id = item.request.request_id
            if request_id in forced:
                tokens = forced[request_id][: item.draft_budget.depth]
                trees[request_id] = TokenTree(tokens, list(range(-1, len(tokens) - 1)), [1.0] * len(tokens),
                                              [1.0] * len(tokens), list(range(1, len(tokens) + 1)))
            else:
                asked.append(item)
        if not asked:
            return trees, {}
        asks = [
            DraftRequest(
                i.request.request_id,
                i.request.slot,
                i.request.all_token_ids,
                i.draft_budget,
                self._take_target_features(i.request.request_id),
            )
            for i in asked
        ]
        step_tokens = sum(item.num_new_tokens for item in scheduled)
        step = StepView([views[item.request.request_id] for item in asked], step_tokens - len(asked))
        start = time.perf_counter()
        drafted = self.drafter.propose(asks, self.controller.drafting_rule(step))
        drafted = [self._allowed_nodes(self.requests[ask.request_id], tree) for ask, tree in zip(asks, drafted)]
        draft_time = time.perf_counter() - start
        self.controller.observe_draft(self.drafter.forwards, step.mean_context, draft_time)
        step.draft_ms = draft_time * 1e3
        chosen = self.controller.select(step, drafted)
        self.spec_stats.draft_time += draft_time
        guesses = {}
        for ask, tree, candidates in zip(asks, chosen, drafted):
            request = self.requests[ask.request_id]
            request.spec_stats.draft_time += draft_time
            if len(tree):
                trees[ask.request_id] = tree
                continue
            self.drafter.accept(ask.request_id, [])  # nothing verified: a plain step of this request
            if len(candidates):
                guesses[ask.request_id] = self.controller.first_guess(candidates)
            for stats in (request.spec_stats, self.spec_stats):
                stats.record(candidates.num_drafted, 0, 0)
        return trees, guesses

    @staticmethod
    def _allowed_nodes(request: Request, tree: TokenTree) -> TokenTree:
        """The drafted nodes whose paths the request's structured output allows: the others
        could never be accepted, so verifying them would only spend the step's budget."""
        if request.constraint is None or not len(tree):
            return tree
        return tree.keep(request.constraint.accepts(tree.token_paths()))

    def _read_prompts(self, requests: list[Request]) -> None:
        """The draft reads the prompts of ``requests`` (of which this step computed the last
        tokens) that it may draft from later: a tree after the first token needs two more, and
        a request whose own budget is no speculation never drafts."""
        reads = [
            DraftRequest(r.request_id, r.slot, r.all_token_ids, OFF, self._take_target_features(r.request_id))
            for r in requests
            if r.params.max_tokens > 2 and self._may_draft(r)
        ]
        if reads:
            self.drafter.read(reads)

    def _score_guesses(self, due: list[Request], picks: list[Pick], guesses: dict[str, TokenTree]) -> None:
        """Tell the controller whether each trimmed tree's first guess was the token the target chose."""
        for request, pick in zip(due, picks):
            if (guess := guesses.get(request.request_id)) is not None:
                self.controller.observe(request.request_id, guess, [0] if pick.tokens[0] == guess.tokens[0] else [])

    def _verify(
        self,
        requests: list[Request],
        rows: list[torch.Tensor],
        trees: dict[str, TokenTree],
        verify_time: float,
        forced: dict[str, list[int]],
    ) -> list[Pick]:
        """Verify each request's tree; keep the accepted path's K/V in both caches (the
        drafter's, and what the controller learns, only for trees the drafter made)."""
        self.spec_stats.verify_time += verify_time
        picks, moves = [], []
        for request, logits in zip(requests, rows):
            tree = trees[request.request_id]
            verdict = verify(
                tree, logits, request.params, request.generator, request.prompt_token_ids, request.output_token_ids,
                request.constraint,
            )
            accepted = len(verdict.accepted)
            root = request.num_computed_tokens - 1  # the root is now cached at its position
            sources = [root + 1 + node for node in verdict.accepted]
            if sources != list(range(root + 1, root + 1 + accepted)):
                moves.append((request.slot, sources, root + 1))
            request.num_computed_tokens += accepted
            if request.request_id not in forced:
                self.drafter.accept(request.request_id, verdict.tokens[:-1])
                self.controller.observe(request.request_id, tree, verdict.accepted)
            logprobs = self._logprobs(
                logits[verdict.row_of_token], verdict.tokens, [request] * len(verdict.tokens)
            )
            picks.append(Pick(verdict.tokens, logprobs, verdict.row_of_token))
            for stats in (request.spec_stats, self.spec_stats):
                stats.record(tree.num_drafted, len(tree), accepted)
            request.spec_stats.verify_time += verify_time
        if moves:
            self.executor.call("keep_kv", moves)
        return picks

    def _keep_target_features(
        self,
        scheduled: list[ScheduledRequest],
        hidden: torch.Tensor,
        trees: dict[str, TokenTree],
        picks: dict[str, Pick],
    ) -> None:
        """Keep, for each request's next DraftRequest, the target's features of the positions it
        cached this step: every fed token, or of a verified tree the root and the accepted nodes.
        Copies, not views: a request that does not draft for a while would otherwise keep every
        step's whole ``hidden`` alive. None for a request that never drafts."""
        sizes = [item.num_new_tokens + len(trees.get(item.request.request_id, ())) for item in scheduled]
        for item, rows in zip(scheduled, hidden.split(sizes)):
            request_id = item.request.request_id
            if not self._may_draft(item.request):
                continue
            rows = rows[picks[request_id].rows] if request_id in trees else rows.clone()
            self._target_features.setdefault(request_id, []).append(rows)

    def _take_target_features(self, request_id: str) -> torch.Tensor | None:
        parts = self._target_features.pop(request_id, None)
        return torch.cat(parts) if parts else None

    @staticmethod
    def _slice(item: ScheduledRequest, tree: TokenTree | None) -> SequenceSlice:
        """The request's new tokens of the step, causal, then its tree's nodes below the last of
        them (the root: chosen, not yet cached), each seeing the root and its ancestors."""
        request, start, new = item.request, item.request.num_computed_tokens, item.num_new_tokens
        end = start + new
        token_ids, positions = request.tokens_between(start, end), list(range(start, end))
        # rows scoring prompt tokens come first; the root's row (and its nodes') pick the next tokens
        logits_at = list(range(item.num_prompt_logits)) + ([new - 1] if item.samples else [])
        if tree is None:
            return SequenceSlice(request.slot, token_ids, positions, start, logits_at=logits_at)
        mask = tree.attention_mask()
        if new > 1:  # a prompt's last chunk before the root: causal, and seen whole by every node
            chunk_mask = torch.ones(new + len(tree), new + len(tree), dtype=torch.bool).tril()
            chunk_mask[new - 1 :, new - 1 :] = mask
            mask = chunk_mask
        return SequenceSlice(
            slot=request.slot,
            token_ids=token_ids + tree.tokens,
            positions=positions + [end - 1 + depth for depth in tree.depths],
            cache_start=start,
            tree_mask=mask,
            logits_at=logits_at + list(range(new, new + len(tree))),
        )

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, tokens: list[int], requests: list[Request]
    ) -> list[dict[int, float] | None]:
        wanted = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        rows: list[dict[int, float] | None] = [None] * len(requests)
        if wanted:
            counts = [requests[i].params.logprobs for i in wanted]
            wanted_logits = logits if len(wanted) == len(requests) else logits[wanted]
            found = top_logprobs(wanted_logits, [tokens[i] for i in wanted], counts)
            for i, row in zip(wanted, found):
                rows[i] = row
        return rows

    def _append_token(
        self, request: Request, token: int, now: float, logprobs: dict[int, float] | None
    ) -> None:
        request.output_token_ids.append(token)
        if logprobs is not None:
            request.output_logprobs.append(logprobs)
        metrics = request.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.token_times.append(now)
        params = request.params
        # EOS and stop tokens end the request but are not part of its text.
        is_stop_token = (
            token in self.eos_token_ids and not params.ignore_eos
        ) or token in params.stop_token_ids
        if not is_stop_token:
            request.detokenizer.add(token)
        complete = False  # the structured output allows nothing more
        if request.constraint is not None:
            request.constraint.accept(token)
            complete = request.constraint.complete
        if is_stop_token or request.detokenizer.stopped_by or complete:
            request.finish(FinishReason.STOP)
        elif len(request.output_token_ids) >= params.max_tokens:
            request.finish(FinishReason.LENGTH)

    def _fail(self, request: Request, error: str) -> RequestOutput:
        request.finish(FinishReason.ERROR, error)
        self._retire(request)
        return request.take_output()

    def _retire(self, request: Request) -> None:
        """Forget a finished request: free its KV slot and any drafter state."""
        self.scheduler.remove(request)
        self.requests.pop(request.request_id, None)
        self._target_features.pop(request.request_id, None)
        if self.drafter is not None:
            self.drafter.release(request.request_id)
            self.controller.forget(request.request_id)

    def _handle_hopeless(self) -> list[RequestOutput]:
        """Waiting requests whose first token can no longer come within their TTFT SLO: finished
        at once (``on_miss: reject``; their outputs), or served after all others (best effort)."""
        now = time.monotonic()
        cost = self.controller.cost if self.controller is not None else None

        def prefill_s(request: Request) -> float:
            return 0.0 if cost is None else cost.prefill_s(request.num_tokens)

        if self.config.control.slo.on_miss == "best_effort":
            self.scheduler.demote_hopeless(now, prefill_s)
            return []
        outputs = []
        for request in self.scheduler.take_hopeless(now, prefill_s):
            waited_ms = (now - request.metrics.arrival_time) * 1e3
            request.finish(
                FinishReason.REJECTED,
                f"rejected: the TTFT SLO of {request.slo.ttft_ms:.0f} ms can no longer be met "
                f"(waited {waited_ms:.0f} ms, prefill needs about {prefill_s(request) * 1e3:.0f} ms)",
            )
            self._retire(request)
            outputs.append(request.take_output())
        return outputs

    # ------------------------------------------------------------ cost model

    def _build_controller(self) -> SLOController:
        policy = self.config.control.policy
        cost = None
        if POLICIES[policy].needs_cost_model:
            cost = self._load_or_profile()
        return SLOController(policy, cost, self.config.max_num_batched_tokens)

    def _load_or_profile(self) -> CostModel:
        """The configured profile, else this model's cached one, else a quick one measured now."""
        if self.config.control.profile is not None:
            return CostModel.load(Path(self.config.control.profile))
        path = self.profile_path()
        if path.is_file():
            return CostModel.load(path)
        logger.info("no cost profile at %s: measuring a quick one", path)
        cost = self.profile(quick=True)
        cost.save(path)
        return cost

    def profile_path(self) -> Path:
        """Where this engine's models, device and TP size keep their cached cost profile."""
        draft = self._draft_model()
        models = [self.model_path] + ([draft.path] if draft is not None else [])
        device = self.config.torch_device()
        if device.type == "cuda":
            hardware = torch.cuda.get_device_name(device)
        else:  # a step's cost follows the GEMM kernels the weights are laid out for
            hardware = (f"{cpu_kernel_environment(self.config.torch_dtype())}|{self.config.weight_layout}"
                        f"|draft {self.config.draft_dtype()}")
        return profile_path(models, str(device), self.config.tensor_parallel_size, hardware)

    def _draft_model(self) -> ModelDrafter | RemoteDrafter | None:
        """The drafter that runs a draft model, here or on its actor, alone or inside a hybrid."""
        drafter = self.drafter.model if isinstance(self.drafter, HybridDrafter) else self.drafter
        return drafter if isinstance(drafter, (ModelDrafter, RemoteDrafter)) else None

    def profile(self, quick: bool = False) -> CostModel:
        """Measure the target's (and the draft model's) forward latency on this hardware."""
        shape = dict(
            num_slots=self.config.max_num_seqs,
            max_len=self.max_model_len,
            max_tokens=self.config.max_num_batched_tokens,
            quick=quick,
        )
        target = profile_forward(lambda s: self.executor.call("forward", s), label="target", **shape)
        drafter = self._draft_model()
        draft = drafter.profile(**shape) if drafter is not None else None
        return CostModel(
            model=self.model_path.name,
            device=str(self.config.torch_device()),
            tensor_parallel_size=self.config.tensor_parallel_size,
            target=target,
            draft=draft,
        )

    def shutdown(self) -> None:
        self.executor.shutdown()
