"""The engine loop in a process of its own, so that serving never shares a GIL with the forward.

In one process, every piece of Python a server runs per streamed token (building the chunk,
Serve's streaming, the event loop) takes the GIL from the engine thread, which gives it up and
takes it back at every torch operator: on a CPU, 1 ms of Python a token slows decoding by about
10 %. Here the engine process runs ``EngineLoop`` alone; the serving process sends it requests
and aborts and receives each step's outputs over one pipe (one message a step), and validates
and tokenizes requests itself with an ``InputProcessor`` of the same model.

Requests travel as ``NewRequest`` (token ids and sampling parameters); the engine process makes
them, compiling any structured-output grammar there. Both ends stop when the pipe closes: the
engine process when its owner goes away, the owner's streams when the engine process dies.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import threading
from pathlib import Path

import torch

from specserve.config import EngineConfig
from specserve.engine.engine_loop import Command, EngineLoop, Outbox
from specserve.engine.heap import freeze_startup_heap
from specserve.engine.inputs import InputProcessor
from specserve.engine.llm_engine import EngineLoad, LLMEngine
from specserve.engine.request import RequestOutput
from specserve.spec.stats import SpecStats

Connection = multiprocessing.connection.Connection


class EngineProcess:
    """The serving side: starts the engine process, sends it commands, hands what it reports to
    ``outbox`` (from a reader thread)."""

    def __init__(self, config: EngineConfig, outbox: Outbox, torch_threads: int | None = None) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        # Not daemonic: a daemonic process may not start the tensor-parallel workers it owns.
        self._process = context.Process(target=_engine_main, args=(config, child, torch_threads),
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
                    outputs, self._load, self._spec_stats = rest
                    self._outbox.outputs(outputs)
                elif kind == "error":
                    self._outbox.error(*rest)
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
        self._send(("outputs", outputs, self.engine.load(), self.engine.spec_stats))

    def error(self, request_id: str, exc: BaseException) -> None:
        self._send(("error", request_id, exc))

    def stopped(self, reason: str | None) -> None:
        self._send(("stopped", reason))

    def _send(self, message: tuple) -> None:
        try:
            self.conn.send(message)
        except OSError:  # the owner went away; the loop stops at its next take
            pass


def _engine_main(config: EngineConfig, conn: Connection, torch_threads: int | None) -> None:
    if torch_threads:
        torch.set_num_threads(torch_threads)
    try:
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
