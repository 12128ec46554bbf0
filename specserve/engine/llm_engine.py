"""The synchronous engine: add requests, call ``step()``, read outputs.

One step flows in one direction: schedule -> build sequence slices -> forward -> sample ->
append tokens, detokenize, check stops -> report outputs and free finished requests' slots.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence

import torch

from specserve.config import EngineConfig
from specserve.engine.detokenizer import IncrementalDetokenizer
from specserve.engine.executor import ModelExecutor
from specserve.engine.request import FinishReason, Request, RequestOutput
from specserve.engine.sampler import sample
from specserve.engine.sampling_params import SamplingParams
from specserve.engine.scheduler import ScheduledRequest, Scheduler
from specserve.models.default_model import default_model_dir
from specserve.models.forward_batch import SequenceSlice
from specserve.models.loader import ModelFiles, eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        model_path = ModelFiles.check(self.config.model or default_model_dir()).path
        self.model_path = model_path
        self.tokenizer = load_tokenizer(model_path)
        self.eos_token_ids = eos_token_ids(model_path, self.tokenizer)
        self.executor = ModelExecutor(self.config, model_path)
        self.max_model_len = self.executor.max_model_len
        self.vocab_size = self.executor.runner.model.arch.vocab_size
        self.scheduler = Scheduler(self.config.max_num_seqs, self.config.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
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
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = [int(t) for t in prompt]
            bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside [0, {self.vocab_size})")
        if not token_ids:
            raise ValueError("prompt must not be empty")
        if len(token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(token_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"the model context of {self.max_model_len} tokens"
            )
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        generator = None if params.greedy else torch.Generator().manual_seed(seed)
        detokenizer = IncrementalDetokenizer(
            self.tokenizer, token_ids, params.stop, params.include_stop_str_in_output
        )
        return Request(request_id, token_ids, params, detokenizer, generator, arrival_time)

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
        self.scheduler.remove(request)
        return request.take_output()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt token ids of a conversation (the template supplies the special tokens)."""
        if not self.tokenizer.chat_template:
            raise ValueError("this model has no chat template")
        if not messages:
            raise ValueError("messages must not be empty")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -------------------------------------------------------------------- steps

    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns outputs of requests that advanced or finished."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        now = time.monotonic()
        for item in scheduled:
            if item.request.metrics.first_scheduled_time is None:
                item.request.metrics.first_scheduled_time = now
        try:
            logits = self.executor.call("forward", [self._slice(item) for item in scheduled])
        except Exception as exc:  # a failed forward fails its batch, never the engine
            logger.exception("forward step failed")
            return [self._fail(item.request, f"forward failed: {exc}") for item in scheduled]
        due = [item.request for item in scheduled if item.completes_context]
        for item in scheduled:
            item.request.num_computed_tokens += item.num_new_tokens
        tokens = sample(logits, [r.params for r in due], [r.generator for r in due])
        now = time.monotonic()
        outputs = []
        for request, token in zip(due, tokens):
            self._append_token(request, token, now)
            outputs.append(request.take_output())
            if request.finished:
                self.scheduler.remove(request)
                del self.requests[request.request_id]
        return outputs

    @staticmethod
    def _slice(item: ScheduledRequest) -> SequenceSlice:
        request, start = item.request, item.request.num_computed_tokens
        end = start + item.num_new_tokens
        return SequenceSlice(
            slot=request.slot,
            token_ids=request.all_token_ids[start:end],
            positions=list(range(start, end)),
            cache_start=start,
            logits_at=[item.num_new_tokens - 1] if item.completes_context else [],
        )

    def _append_token(self, request: Request, token: int, now: float) -> None:
        request.output_token_ids.append(token)
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
        if is_stop_token or request.detokenizer.stopped_by:
            request.finish(FinishReason.STOP)
        elif len(request.output_token_ids) >= params.max_tokens:
            request.finish(FinishReason.LENGTH)

    def _fail(self, request: Request, error: str) -> RequestOutput:
        request.finish(FinishReason.ERROR, error)
        self.scheduler.remove(request)
        self.requests.pop(request.request_id, None)
        return request.take_output()

    def shutdown(self) -> None:
        self.executor.shutdown()
