"""The loop that drives an engine: take commands, step, hand the outputs on.

The same loop runs in a thread of the serving process (``AsyncLLMEngine``'s default) or in a
process of its own (``engine_process.py``); only where its commands come from (an ``Inbox``) and
where its outputs go (an ``Outbox``) differ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from specserve.engine.llm_engine import LLMEngine
from specserve.engine.request import Request, RequestOutput
from specserve.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewRequest:
    """A request for the engine to make (validated, tokenized) where a Request itself cannot go:
    across processes."""

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    arrival_time: float


# ("add", Request | NewRequest), ("abort", request id) or ("stop", None)
Command = tuple[str, Request | NewRequest | str | None]


class Inbox(Protocol):
    def take(self, wait: bool) -> list[Command]:
        """The commands that arrived; with ``wait``, block until there is one."""


class Outbox(Protocol):
    def outputs(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs."""

    def error(self, request_id: str, exc: BaseException) -> None:
        """A request failed before or outside a step's outputs."""

    def stopped(self, reason: str | None) -> None:
        """The loop has ended: asked to (``None``) or for good after a failure."""


class EngineLoop:
    def __init__(self, engine: LLMEngine, inbox: Inbox, outbox: Outbox) -> None:
        self.engine = engine
        self.inbox = inbox
        self.outbox = outbox
        self._stopped = False

    def run(self) -> None:
        reason = None
        while not self._stopped:
            commands = self.inbox.take(wait=not self.engine.has_unfinished_requests())
            self._apply(commands)
            if self._stopped:
                break
            if not self.engine.has_unfinished_requests():
                if commands:  # e.g. the last request was aborted: report the idle engine
                    self.outbox.outputs([])
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # fail what was in flight; go on unless a TP worker died
                logger.exception("engine step failed")
                for request_id in list(self.engine.requests):
                    self.engine.abort_request(request_id)
                    self.outbox.error(request_id, RuntimeError(f"engine step failed: {exc}"))
                reason = self._stop_if_workers_died()
                continue
            self.outbox.outputs(outputs)
            if any(output.error for output in outputs):
                reason = self._stop_if_workers_died()
        self.outbox.stopped(reason)

    def _apply(self, commands: list[Command]) -> None:
        for kind, arg in commands:
            if kind == "add":
                try:
                    request = arg if isinstance(arg, Request) else self.engine.make_request(
                        arg.request_id, arg.token_ids, arg.params, arg.arrival_time)
                    self.engine.add_request(request)
                except ValueError as exc:
                    self.outbox.error(arg.request_id, exc)
                except Exception as exc:  # e.g. a grammar compiler's own failure: this request's alone
                    logger.exception("making request %s failed", arg.request_id)
                    self.outbox.error(arg.request_id, RuntimeError(f"request failed: {exc}"))
            elif kind == "abort":  # its final output ends its stream, if anyone still reads it
                if (output := self.engine.abort_request(arg)) is not None:
                    self.outbox.outputs([output])
            else:
                self._stopped = True

    def _stop_if_workers_died(self) -> str | None:
        """Stop for good and fail every request if the tensor-parallel group is gone (the owner,
        e.g. a Serve replica's health check, replaces the engine); the reason, if so."""
        if self.engine.executor.healthy(wait_s=5.0):
            return None
        reason = "the tensor-parallel group failed (a worker died or stopped answering)"
        self._stopped = True
        self._apply(self.inbox.take(wait=False))  # adds that raced in are failed below
        for request_id in list(self.engine.requests):
            self.engine.abort_request(request_id)
            self.outbox.error(request_id, RuntimeError(f"the engine has stopped: {reason}"))
        return reason
