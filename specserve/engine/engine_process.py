"""The engine loop in a process of its own, so that serving never shares a GIL with the forward.

In one process, every piece of Python a server runs per streamed token (building the chunk,
Serve's streaming, the event loop) takes the GIL from the engine thread, which gives it up and
takes it back at every torch operator: on a CPU, 1 ms of Python a token slows decoding by about
10 %. Here the engine process runs ``EngineLoop`` alone; the serving process sends it requests
and aborts and receives each step's outputs over one pipe (one message a step), and validates
and tokenizes requests itself with an ``InputProcessor`` of the same model.

Requests travel as ``NewRequest`` (token ids and sampling parameters); the engine process makes
them, compiling any structured-output grammar there. A request's first output crosses whole and
every later one as an ``OutputDelta`` (its new tokens, text and times), from which the serving
side rebuilds the cumulative output, so a step's message stays small however long the outputs
grow. Both ends stop when the pipe closes: the engine process when its owner goes away, the
owner's streams when the engine process dies.

An engine that starts Ray actors (a draft actor, tensor-parallel ranks) joins its owner's Ray
cluster from the engine process (``RayContext``); the actors end with that process.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from specserve.config import EngineConfig
from specserve.distributed.ray_context import RayContext
from specserve.engine.engine_loop import Command, EngineLoop, Outbox
from specserve.engine.heap import freeze_startup_heap
from specserve.engine.inputs import InputProcessor
from specserve.engine.llm_engine import EngineLoad, LLMEngine
from specserve.engine.request import CompletionOutput, FinishReason, RequestOutput
from specserve.spec.stats import SpecStats

Connection = multiprocessing.connection.Connection


@dataclass(frozen=True)
class OutputDelta:
    """What a request's output adds to its previous one."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    token_times: list[float]
    finish_reason: FinishReason | None
    finished: bool
    error: str | None
    spec_stats: SpecStats | None
    first_token_time: float | None
    finished_time: float | None


def output_delta(output: RequestOutput) -> OutputDelta:
    """``output`` less what the request's previous outputs reported."""
    new = len(output.output.delta_token_ids)
    logprobs = output.output.logprobs
    return OutputDelta(
        request_id=output.request_id,
        text=output.output.delta_text,
        token_ids=output.output.delta_token_ids,
        logprobs=None if logprobs is None else logprobs[len(logprobs) - new :],
        token_times=output.metrics.token_times[len(output.metrics.token_times) - new :],
        finish_reason=output.output.finish_reason,
        finished=output.finished,
        error=output.error,
        spec_stats=output.spec_stats,
        first_token_time=output.metrics.first_token_time,
        finished_time=output.metrics.finished_time,
    )


class OutputAssembler:
    """Rebuilds each request's cumulative outputs from its first output and later deltas."""

    def __init__(self) -> None:
        self._last: dict[str, RequestOutput] = {}

    def add(self, item: RequestOutput | OutputDelta) -> RequestOutput | None:
        """The request's output now; None for a request this side has forgotten (aborted)."""
        if isinstance(item, RequestOutput):
            output = item
        elif (last := self._last.get(item.request_id)) is None:
            return None
        else:
            metrics = last.metrics
            metrics.token_times.extend(item.token_times)
            metrics.first_token_time, metrics.finished_time = item.first_token_time, item.finished_time
            logprobs = None if item.logprobs is None else (last.output.logprobs or []) + item.logprobs
            output = RequestOutput(
                request_id=item.request_id,
                prompt_token_ids=last.prompt_token_ids,
                output=CompletionOutput(
                    text=last.output.text + item.text,
                    token_ids=last.output.token_ids + item.token_ids,
                    delta_text=item.text,
                    delta_token_ids=item.token_ids,
                    finish_reason=item.finish_reason,
                    logprobs=logprobs,
                ),
                finished=item.finished,
                metrics=metrics,
                error=item.error,
                spec_stats=item.spec_stats,
                slo=last.slo,
                prompt_logprobs=last.prompt_logprobs,
            )
        if output.finished:
            self._last.pop(output.request_id, None)
        else:
            self._last[output.request_id] = output
        return output

    def forget(self, request_id: str) -> None:
        self._last.pop(request_id, None)


class EngineProcess:
    """The serving side: starts the engine process, sends it commands, hands what it reports to
    ``outbox`` (from a reader thread)."""

    def __init__(self, config: EngineConfig, outbox: Outbox, torch_threads: int | None = None) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        # Not daemonic: a daemonic process may not start the tensor-parallel workers it owns.
        ray_context = RayContext.of_this_process() if config.uses_ray else None
        self._process = context.Process(target=_engine_main, args=(config, child, torch_threads, ray_context),
                                        name="specserve-engine")
        self._process.start()
        child.close()
        # Close the pipe before multiprocessing joins its children at exit: that ends the engine.
        multiprocessing.util.Finalize(self, self._conn.close, exitpriority=10)
        try:
            kind, info = self._conn.recv()
        except EOFError:
            self._process.join(timeout=5)
            raise RuntimeError(f"the engine process exited while starting (exit code {self._process.exitcode})")
        if kind == "failed":
            self._process.join(timeout=30)
            raise RuntimeError(f"the engine process failed to start: {info}")
        self.inputs = InputProcessor(config, Path(info["model_path"]), info["vocab_size"], info["max_model_len"])
        self.pid = self._process.pid
        self._load = EngineLoad(waiting=0, running=0, kv_usage=0.0, on_track=1.0)
        self._spec_stats = SpecStats()
        self._outbox = outbox
        self._assembler = OutputAssembler()  # used by the reader thread only
        self._send_lock = threading.Lock()  # commands come from any thread
        self._reader = threading.Thread(target=self._read, name="specserve-engine-outputs", daemon=True)
        self._reader.start()

    def send(self, command: Command) -> None:
        with self._send_lock:
            try:
                self._conn.send(command)
            except OSError:  # closed: the engine is gone, and the reader fails its requests
                pass

    def load(self) -> EngineLoad:
        """The engine's load after its last step."""
        return self._load

    def spec_stats(self) -> SpecStats:
        """The engine's speculation totals after its last step."""
        return self._spec_stats

    def is_alive(self) -> bool:
        return self._reader.is_alive()

    def stop(self, timeout_s: float = 60) -> None:
        self.send(("stop", None))
        self._reader.join(timeout=timeout_s)
        self._process.join(timeout=timeout_s)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()

    def _read(self) -> None:
        try:
            while True:
                kind, *rest = self._conn.recv()
                if kind == "outputs":
                    items, self._load, self._spec_stats = rest
                    outputs = [self._assembler.add(item) for item in items]
                    self._outbox.outputs([output for output in outputs if output is not None])
                elif kind == "error":
                    request_id, exc = rest
                    self._assembler.forget(request_id)
                    self._outbox.error(request_id, exc)
                else:
                    self._outbox.stopped(rest[0])
                    return
        except (EOFError, OSError):
            self._process.join(timeout=5)
            self._outbox.stopped(f"the engine process exited (exit code {self._process.exitcode})")


class _PipeEnds:
    """The engine process's inbox and outbox: the pipe to its owner."""

    def __init__(self, conn: Connection, engine: LLMEngine) -> None:
        self.conn = conn
        self.engine = engine
        self._reported: set[str] = set()  # requests whose first output has crossed

    def take(self, wait: bool) -> list[Command]:
        commands = []
        try:
            if wait:
                self.conn.poll(None)
            while self.conn.poll(0):
                commands.append(self.conn.recv())
        except (EOFError, OSError):  # the owner went away
            commands.append(("stop", None))
        return commands

    def outputs(self, outputs: list[RequestOutput]) -> None:
        items = []
        for output in outputs:
            items.append(output_delta(output) if output.request_id in self._reported else output)
            if output.finished:
                self._reported.discard(output.request_id)
            else:
                self._reported.add(output.request_id)
        self._send(("outputs", items, self.engine.load(), self.engine.spec_stats))

    def error(self, request_id: str, exc: BaseException) -> None:
        self._reported.discard(request_id)
        self._send(("error", request_id, exc))

    def stopped(self, reason: str | None) -> None:
        self._send(("stopped", reason))

    def _send(self, message: tuple) -> None:
        try:
            self.conn.send(message)
        except OSError:  # the owner went away; the loop stops at its next take
            pass


def _engine_main(config: EngineConfig, conn: Connection, torch_threads: int | None,
                 ray_context: RayContext | None) -> None:
    if torch_threads:
        torch.set_num_threads(torch_threads)
    try:
        if ray_context is not None:
            ray_context.join()
        engine = LLMEngine(config)
    except Exception as exc:  # reported to the owner, which raises it
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    freeze_startup_heap()  # this process exists to run the engine
    conn.send(("ready", {"model_path": str(engine.model_path), "vocab_size": engine.vocab_size,
                         "max_model_len": engine.max_model_len}))
    ends = _PipeEnds(conn, engine)
    try:
        EngineLoop(engine, ends, ends).run()
    finally:
        engine.shutdown()
        conn.close()
