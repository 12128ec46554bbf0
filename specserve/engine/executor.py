"""Runs a ModelRunner on every rank of a tensor-parallel group.

Rank 0 lives in the engine process; ranks 1..N-1 are workers that wait for calls: local
processes, or Ray actors in a placement group (``EngineConfig.worker_backend``). Each call (a
method name and its arguments) is broadcast from rank 0 over a gloo group and executed by every
rank in lockstep, so the collectives inside the forward line up, and no Ray call is made per
step. Rank 0's result is returned (every rank computes the same gathered logits).
"""

from __future__ import annotations

import socket
import time
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
from specserve.distributed.ray_context import current_placement_group
from specserve.engine.heap import freeze_startup_heap
from specserve.engine.model_runner import ModelRunner

_SHUTDOWN = "__shutdown__"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _serve_calls(runner: ModelRunner, tp: TensorParallelGroup) -> None:
    """A worker rank's loop: run every call rank 0 broadcasts, until the shutdown call. The
    rank's process (or actor) exists for this loop, so its start-up heap is frozen."""
    freeze_startup_heap()
    while True:
        method, args = tp.broadcast_object()
        if method == _SHUTDOWN:
            break
        getattr(runner, method)(*args)
    destroy_tensor_parallel(tp)


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
    _serve_calls(runner, tp)


class _ProcessWorkers:
    """Ranks 1..N-1 as spawned local processes."""

    def __init__(self, config: EngineConfig, model_path: Path, init_method: str) -> None:
        ctx = mp.get_context("spawn")
        self._ready = ctx.Queue()
        self.procs = []
        for rank in range(1, config.tensor_parallel_size):
            proc = ctx.Process(
                target=_worker_main, args=(rank, config, model_path, init_method, self._ready), daemon=True
            )
            proc.start()
            self.procs.append(proc)

    def wait_ready(self) -> None:
        for _ in self.procs:
            error = self._ready.get(timeout=600)
            if error is not None:
                raise RuntimeError(f"tensor-parallel worker failed to start: {error}")

    def alive(self, wait_s: float = 0.0) -> bool:
        deadline = time.monotonic() + wait_s
        while all(proc.is_alive() for proc in self.procs):
            if time.monotonic() >= deadline:
                return True
            time.sleep(0.05)
        return False

    def join(self) -> None:
        for proc in self.procs:
            proc.join(timeout=30)

    def kill(self) -> None:
        for proc in self.procs:
            proc.kill()


class TensorParallelWorker:
    """One worker rank as a Ray actor: load the shard, then serve rank 0's calls."""

    def load(self, rank: int, config: EngineConfig, model_path: Path, init_method: str) -> None:
        self.tp = init_tensor_parallel(rank, config.tensor_parallel_size, init_method, config.torch_device())
        self.runner = ModelRunner(config, model_path, self.tp)

    def serve_calls(self) -> None:
        _serve_calls(self.runner, self.tp)


class _RayWorkers:
    """Ranks 1..N-1 as Ray actors in a STRICT_PACK placement group: the replica's own when it
    has one (Serve's ``placement_group_bundles``, rank r in bundle r; also from the replica's
    engine process), else one made here."""

    def __init__(self, config: EngineConfig, model_path: Path, init_method: str) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        size = config.tensor_parallel_size
        gpu = config.torch_device().type == "cuda"
        resources = {"CPU": 1, "GPU": 1} if gpu else {"CPU": 1}
        group = current_placement_group()
        self._owned_group = None
        first_bundle = 1
        if group is None:
            group = self._owned_group = placement_group([resources] * (size - 1), strategy="STRICT_PACK")
            ray.get(group.ready(), timeout=600)
            first_bundle = 0
        actor = ray.remote(TensorParallelWorker)
        self.actors = [
            actor.options(
                num_cpus=1, num_gpus=1 if gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=first_bundle + i
                ),
            ).remote()
            for i in range(size - 1)
        ]
        self._loads = [a.load.remote(rank, config, model_path, init_method)
                       for rank, a in enumerate(self.actors, start=1)]
        self._loops: list = []

    def wait_ready(self) -> None:
        import ray

        ray.get(self._loads, timeout=600)
        self._loops = [a.serve_calls.remote() for a in self.actors]

    def alive(self, wait_s: float = 0.0) -> bool:
        import ray

        finished, _ = ray.wait(self._loops, num_returns=1, timeout=wait_s)
        return not finished  # a worker's loop only returns at shutdown, or fails when it dies

    def join(self) -> None:
        import ray

        ray.wait(self._loops, num_returns=len(self._loops), timeout=30)
        self.kill()

    def kill(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a)
        if self._owned_group is not None:
            remove_placement_group(self._owned_group)
            self._owned_group = None


def _node_address() -> str:
    """An address of this machine the other ranks can reach (Ray's node IP when on Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


class ModelExecutor:
    """The engine's handle on its model: one runner, or a TP group of them."""

    def __init__(self, config: EngineConfig, model_path: Path) -> None:
        size = config.tensor_parallel_size
        self.workers: _ProcessWorkers | _RayWorkers | None = None
        self.broken = False
        self.tp: TensorParallelGroup = SINGLE_PROCESS
        if size > 1:
            host = _node_address() if config.worker_backend == "ray" else "127.0.0.1"
            init_method = f"tcp://{host}:{_free_port()}"
            launcher = _RayWorkers if config.worker_backend == "ray" else _ProcessWorkers
            self.workers = launcher(config, model_path, init_method)
        try:
            if size > 1:
                self.tp = init_tensor_parallel(
                    0, size, init_method, config.torch_device(), config.collective_timeout_s
                )
            self.runner = ModelRunner(config, model_path, self.tp)
            if self.workers is not None:
                self.workers.wait_ready()
        except BaseException:
            if self.workers is not None:
                self.workers.kill()
            destroy_tensor_parallel(self.tp)
            raise
        self.max_model_len = self.runner.max_model_len

    def call(self, method: str, *args: Any) -> Any:
        """Run ``runner.method(*args)`` on every rank; returns rank 0's result.

        With workers, a failed call leaves the ranks out of lockstep (some inside a collective
        the others left), so the group is broken for good.
        """
        if self.broken:
            raise RuntimeError("the tensor-parallel group is broken by an earlier failure")
        try:
            self.tp.broadcast_object((method, args))
            return getattr(self.runner, method)(*args)
        except Exception:
            self.broken = self.workers is not None
            raise

    def healthy(self, wait_s: float = 0.0) -> bool:
        """Whether the TP group can still run calls: no call failed, and every worker rank is
        still running (after a failed step, give ``wait_s`` for a worker's death to be known)."""
        return self.workers is None or (not self.broken and self.workers.alive(wait_s))

    def shutdown(self) -> None:
        if self.workers is None:
            return
        if not self.broken and self.workers.alive():
            self.tp.broadcast_object((_SHUTDOWN, ()))
            self.workers.join()
        else:
            self.workers.kill()
        destroy_tensor_parallel(self.tp)
        self.workers = None
