"""Runs a ModelRunner on every rank of a tensor-parallel group.

Rank 0 lives in the engine process; ranks 1..N-1 are worker processes that wait for calls. Each
call (a method name and its arguments) is broadcast from rank 0 over a gloo group and executed
by every rank in lockstep, so the collectives inside the forward line up. Rank 0's result is
returned (every rank computes the same gathered logits).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from specserve.config import EngineConfig
from specserve.distributed.parallel_state import (
    SINGLE_PROCESS,
    TensorParallelGroup,
    destroy_tensor_parallel,
    init_tensor_parallel,
)
from specserve.engine.model_runner import ModelRunner

_SHUTDOWN = "__shutdown__"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(
    rank: int, config: EngineConfig, model_path: Path, init_method: str, ready: Any
) -> None:
    tp = init_tensor_parallel(rank, config.tensor_parallel_size, init_method, config.torch_device())
    try:
        runner = ModelRunner(config, model_path, tp)
        ready.put(None)
    except Exception as exc:  # the driver reports it; then every rank exits
        ready.put(repr(exc))
        raise
    while True:
        method, args = tp.broadcast_object()
        if method == _SHUTDOWN:
            break
        getattr(runner, method)(*args)
    destroy_tensor_parallel(tp)


class ModelExecutor:
    """The engine's handle on its model: one runner, or a TP group of them."""

    def __init__(self, config: EngineConfig, model_path: Path) -> None:
        size = config.tensor_parallel_size
        self.workers: list[mp.Process] = []
        self.tp: TensorParallelGroup = SINGLE_PROCESS
        if size > 1:
            init_method = f"tcp://127.0.0.1:{_free_port()}"
            ctx = mp.get_context("spawn")
            ready = ctx.Queue()
            for rank in range(1, size):
                proc = ctx.Process(
                    target=_worker_main,
                    args=(rank, config, model_path, init_method, ready),
                    daemon=True,
                )
                proc.start()
                self.workers.append(proc)
        try:
            if size > 1:
                self.tp = init_tensor_parallel(0, size, init_method, config.torch_device())
            self.runner = ModelRunner(config, model_path, self.tp)
            for _ in self.workers:
                error = ready.get(timeout=600)
                if error is not None:
                    raise RuntimeError(f"tensor-parallel worker failed to start: {error}")
        except BaseException:
            for proc in self.workers:
                proc.kill()
            destroy_tensor_parallel(self.tp)
            raise
        self.max_model_len = self.runner.max_model_len

    def call(self, method: str, *args: Any) -> Any:
        """Run ``runner.method(*args)`` on every rank; returns rank 0's result."""
        self.tp.broadcast_object((method, args))
        return getattr(self.runner, method)(*args)

    def shutdown(self) -> None:
        if self.workers:
            self.tp.broadcast_object((_SHUTDOWN, ()))
            for proc in self.workers:
                proc.join(timeout=30)
            destroy_tensor_parallel(self.tp)
            self.workers = []
