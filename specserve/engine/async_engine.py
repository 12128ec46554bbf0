"""Asyncio front of the engine: token streaming, abort on cancellation.

The engine is driven by one background thread that owns it; callers on any event loop hand it
requests and aborts through a queue, and receive outputs through per-request asyncio queues.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from specserve.config import EngineConfig
from specserve.engine.llm_engine import LLMEngine, Prompt
from specserve.engine.request import FinishReason, Request, RequestOutput
from specserve.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class RequestRejected(RuntimeError):
    """The engine turned a request away: it could no longer meet its TTFT SLO (on_miss='reject')."""

    def __init__(self, output: RequestOutput) -> None:
        super().__init__(output.error)
        self.output = output


def _put_all(deliveries: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue_, output in deliveries:
        queue_.put_nowait(output)


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None) -> None:
        self.engine = engine or LLMEngine(config)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wakeup = threading.Event()
        self._stopped = False
        self._failure: str | None = None  # why the loop stopped on its own
        self._thread = threading.Thread(target=self._run, name="specserve-engine", daemon=True)
        self._thread.start()

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request; raises ValueError at once on invalid input,
        RequestRejected if the engine turns it away, RuntimeError if it fails.

        Leaving the iteration early (or cancelling the task) aborts the request.
        """
        request_id = request_id or uuid.uuid4().hex
        if params.structured is not None:  # compiling a grammar may take a second: not on the loop
            request = await asyncio.to_thread(self.engine.make_request, request_id, prompt, params)
        else:
            request = self.engine.make_request(request_id, prompt, params)
        if not self.is_alive():
            raise RuntimeError(f"the engine has stopped: {self._failure or 'shut down'}")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        self._send(("add", request))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                if item.error:
                    rejected = item.output.finish_reason is FinishReason.REJECTED
                    raise RequestRejected(item) if rejected else RuntimeError(item.error)
                yield item
        finally:
            if not finished:
                self._send(("abort", request_id))
            self._streams.pop(request_id, None)

    @property
    def num_requests(self) -> int:
        """Requests handed to this engine and not yet ended (queued commands included)."""
        return len(self._streams)

    def is_alive(self) -> bool:
        """Whether the engine loop is still running."""
        return self._thread.is_alive() and not self._stopped

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def stop(self) -> None:
        """Stop the engine loop; the LLMEngine stays usable by whoever else holds it."""
        self._send(("stop", None))
        self._thread.join(timeout=60)

    def shutdown(self) -> None:
        self.stop()
        self.engine.shutdown()

    def _send(self, command: tuple[str, Request | str | None]) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def _apply_commands(self) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.engine.add_request(arg)
                except ValueError as exc:
                    self._deliver_error(arg.request_id, exc)
            elif kind == "abort":
                self.engine.abort_request(arg)
            else:
                self._stopped = True

    def _deliver_error(self, request_id: str, exc: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(exc)

    def _fail_everything(self, reason: str) -> None:
        """Stop the loop for good and fail every request still waiting on it (the owner, e.g.
        a Serve replica's health check, replaces the engine)."""
        self._failure = reason
        self._stopped = True
        self._apply_commands()  # adds that raced in are failed below
        for request_id in list(self._streams):
            self.engine.abort_request(request_id)
            self._deliver_error(request_id, RuntimeError(f"the engine has stopped: {reason}"))

    def _run(self) -> None:
        while not self._stopped:
            self._apply_commands()
            if self._stopped:
                break
            if not self.engine.has_unfinished_requests():
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # fail what was in flight; go on unless a TP worker died
                logger.exception("engine step failed")
                for request_id in list(self.engine.requests):
                    self.engine.abort_request(request_id)
                    self._deliver_error(request_id, RuntimeError(f"engine step failed: {exc}"))
                self._stop_if_workers_died()
                continue
            self._deliver(outputs)
            if any(output.error for output in outputs):
                self._stop_if_workers_died()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams with one wake-up per event loop (a wake-up
        takes the GIL from the engine thread, so one per request would slow the next step)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.queue, output))
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, deliveries)
            except RuntimeError:  # the loop was closed under its streams: nobody is listening
                for _, output in deliveries:
                    self._streams.pop(output.request_id, None)
                    self.engine.abort_request(output.request_id)

    def _stop_if_workers_died(self) -> None:
        if not self.engine.executor.healthy(wait_s=5.0):
            self._fail_everything("the tensor-parallel group failed (a worker died or stopped answering)")
