"""Asyncio front of the engine: token streaming, abort on cancellation.

The engine is driven by one ``EngineLoop`` that owns it: in a background thread of this process
(the default), or in a process of its own (``own_process``, see ``engine_process.py``). Callers
on any event loop hand it requests and aborts, and receive outputs through per-request asyncio
queues.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass

from specserve.config import EngineConfig
from specserve.engine.engine_loop import Command, EngineLoop, NewRequest, Outbox
from specserve.engine.engine_process import EngineProcess
from specserve.engine.inputs import InputProcessor
from specserve.engine.llm_engine import EngineLoad, LLMEngine, Prompt
from specserve.engine.request import FinishReason, RequestOutput
from specserve.engine.sampling_params import SamplingParams
from specserve.spec.stats import SpecStats


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


class EngineThread:
    """The engine loop in a background thread of this process.

    An engine this thread makes (``make_engine``) is made in it, so that all the engine's torch
    work runs on one thread: each thread that runs OpenMP parallel regions keeps a team of its
    own, and once a process's OpenMP threads outnumber its cores, libgomp makes idle ones sleep
    instead of spin, which on two cores slowed two-thread decoding by a half (63 against 38 ms a
    step).
    """

    def __init__(self, make_engine: Callable[[], LLMEngine], outbox: Outbox) -> None:
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        made: Future[LLMEngine] = Future()

        def run() -> None:
            try:
                engine = make_engine()
            except BaseException as exc:  # raised to the caller
                made.set_exception(exc)
                return
            made.set_result(engine)
            EngineLoop(engine, self, outbox).run()

        self._thread = threading.Thread(target=run, name="specserve-engine", daemon=True)
        self._thread.start()
        self.engine = made.result()
        self.inputs = self.engine.inputs

    def send(self, command: Command) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def take(self, wait: bool) -> list[Command]:
        if wait:
            self._wakeup.wait()
            self._wakeup.clear()
        commands = []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def load(self) -> EngineLoad:
        return self.engine.load()

    def spec_stats(self) -> SpecStats:
        return self.engine.spec_stats

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 60) -> None:
        self.send(("stop", None))
        self._thread.join(timeout=timeout_s)


class AsyncLLMEngine:
    """Streams of engine outputs for asyncio callers.

    ``engine``: drive this LLMEngine (in a thread); otherwise one is made from ``config``, in the
    loop's thread or, with ``own_process``, in a process of its own with ``torch_threads`` threads.
    """

    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None,
                 own_process: bool = False, torch_threads: int | None = None) -> None:
        self._streams: dict[str, _Stream] = {}
        self._failure: str | None = None  # why the loop stopped on its own
        self._stopped = False
        self._core: EngineThread | EngineProcess
        if own_process:
            if engine is not None:
                raise ValueError("an engine of its own process is made there, from the config")
            self._core = EngineProcess(config or EngineConfig(), self, torch_threads)
            self.engine: LLMEngine | None = None
        else:
            self._core = EngineThread(lambda: engine or LLMEngine(config), self)
            self.engine = self._core.engine
        self.inputs: InputProcessor = self._core.inputs

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
        # Counted in num_requests from the first step of the iteration, before anything awaits, so
        # that an admission check just before it sees every request admitted so far; a loop that
        # stops from now on fails the stream.
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        sent = finished = False
        try:
            if self.engine is None:
                request = NewRequest(request_id, self.inputs.prompt_ids(prompt, params), params, time.monotonic())
            elif params.structured is not None:  # compiling a grammar may take a second: not on the loop
                request = await asyncio.to_thread(self.engine.make_request, request_id, prompt, params)
            else:
                request = self.engine.make_request(request_id, prompt, params)
            if not self.is_alive():
                raise RuntimeError(f"the engine has stopped: {self._failure or 'shut down'}")
            self._core.send(("add", request))
            sent = True
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
            if sent and not finished:
                self._core.send(("abort", request_id))
            self._streams.pop(request_id, None)

    @property
    def pid(self) -> int | None:
        """The engine process's id; None where the engine runs in a thread of this process."""
        return self._core.pid if isinstance(self._core, EngineProcess) else None

    @property
    def num_requests(self) -> int:
        """Requests handed to this engine and not yet ended (queued commands included)."""
        return len(self._streams)

    def load(self) -> EngineLoad:
        """How busy the engine is (after its last step, where it runs in another process)."""
        return self._core.load()

    def spec_stats(self) -> SpecStats:
        """The engine's speculation totals."""
        return self._core.spec_stats()

    def is_alive(self) -> bool:
        """Whether the engine loop is still running."""
        return self._core.is_alive() and not self._stopped

    def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with an output whose finish reason is abort."""
        self._core.send(("abort", request_id))

    def stop(self) -> None:
        """Stop the engine loop; an LLMEngine given to this front stays usable by whoever else
        holds it."""
        self._core.stop()

    def shutdown(self) -> None:
        self.stop()
        if self.engine is not None:
            self.engine.shutdown()

    # -------------------------------------------------- the loop's outbox

    def outputs(self, outputs: list[RequestOutput]) -> None:
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
                    self._core.send(("abort", output.request_id))

    def error(self, request_id: str, exc: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(exc)

    def stopped(self, reason: str | None) -> None:
        """The loop ended (for good after a failure, ``reason``): every request still waiting on
        it fails (the owner, e.g. a Serve replica's health check, replaces a failed engine)."""
        self._stopped = True
        self._failure = reason
        for request_id in list(self._streams):
            self.error(request_id, RuntimeError(f"the engine has stopped: {reason or 'shut down'}"))
