"""A request's state inside the engine, and what the engine reports about it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from specserve.control.slo import SLO
from specserve.engine.detokenizer import IncrementalDetokenizer
from specserve.engine.sampling_params import SamplingParams
from specserve.engine.structured import TokenConstraint
from specserve.spec.stats import SpecStats


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, stop token or stop string
    LENGTH = "length"  # max_tokens or the KV slot is full
    ABORT = "abort"
    REJECTED = "rejected"  # could no longer meet its SLO and the config says reject
    ERROR = "error"


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.monotonic) of one request."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished_time: float | None = None

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first output token (for a request of max_tokens 0, to the
        end of its prefill)."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first (None with fewer than two tokens)."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


@dataclass
class CompletionOutput:
    """Cumulative output of a request, plus what is new since the last report."""

    text: str
    token_ids: list[int]
    delta_text: str
    delta_token_ids: list[int]
    finish_reason: FinishReason | None
    logprobs: list[dict[int, float]] | None = None  # per output token, if requested


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    output: CompletionOutput
    finished: bool
    metrics: RequestMetrics
    error: str | None = None
    spec_stats: SpecStats | None = None  # when the request was speculated on
    slo: SLO = field(default_factory=SLO)
    # If requested: per prompt token, its log-probability and the top alternatives (None for the
    # first token, which nothing predicts). Complete from the first output on; not a copy.
    prompt_logprobs: list[dict[int, float] | None] | None = None


class Request:
    """Everything the scheduler, runner and sampler need to know about one request."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        detokenizer: IncrementalDetokenizer,
        generator: torch.Generator | None,
        arrival_time: float | None = None,
        slo: SLO | None = None,
        constraint: TokenConstraint | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.slo = slo or SLO()
        self.detokenizer = detokenizer
        self.generator = generator
        self.constraint = constraint  # structured output: what may follow its output so far
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[dict[int, float]] = []
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            None if params.prompt_logprobs is None else [None]
        )
        self.spec_stats = SpecStats()
        self.status = RequestStatus.WAITING
        self.slot: int | None = None
        self.num_computed_tokens = 0  # tokens whose K/V are in the slot
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self.metrics = RequestMetrics(arrival_time=arrival_time or time.monotonic())
        self._reported_tokens = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def tokens_between(self, start: int, end: int) -> list[int]:
        """``all_token_ids[start:end]``, without building the whole sequence every step."""
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len : end - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - prompt_len]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def ttft_deadline(self) -> float:
        """When its first token is due (monotonic seconds; inf without a TTFT SLO)."""
        if self.slo.ttft_ms is None:
            return float("inf")
        return self.metrics.arrival_time + self.slo.ttft_ms / 1e3

    def on_track(self, now: float) -> bool:
        """Whether it can still meet its SLO: a waiting request before its TTFT deadline, a
        running one whose TPOT so far is within its target."""
        if self.metrics.first_token_time is None:
            return now <= self.ttft_deadline
        tpot = self.metrics.tpot
        return self.slo.tpot_ms is None or tpot is None or tpot * 1e3 <= self.slo.tpot_ms

    @property
    def is_decoding(self) -> bool:
        """Everything but the last sampled token is cached: the next step decodes it."""
        return not self.is_prefilling and self.num_tokens - self.num_computed_tokens == 1

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def finish(self, reason: FinishReason, error: str | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.error = error
        self.metrics.finished_time = time.monotonic()

    def take_output(self) -> RequestOutput:
        """Report the request's state, marking everything in it as delivered."""
        delta_ids = self.output_token_ids[self._reported_tokens :]
        self._reported_tokens = len(self.output_token_ids)
        delta_text = self.detokenizer.take_new_text(self.finished)
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            output=CompletionOutput(
                text=self.detokenizer.text[: self.detokenizer.emitted],
                token_ids=list(self.output_token_ids),
                delta_text=delta_text,
                delta_token_ids=delta_ids,
                finish_reason=self.finish_reason,
                logprobs=None if self.params.logprobs is None else list(self.output_logprobs),
            ),
            finished=self.finished,
            metrics=self.metrics,
            error=self.error,
            spec_stats=self.spec_stats if self.spec_stats.steps else None,
            slo=self.slo,
            prompt_logprobs=self.prompt_logprobs,
        )
