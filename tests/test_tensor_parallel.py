"""TP=2 on CPU (two processes over gloo) gives the same greedy tokens as TP=1."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from specserve.config import EngineConfig
from specserve.engine.async_engine import AsyncLLMEngine
from specserve.engine.sampling_params import SamplingParams
from specserve.llm import LLM
from tiny_models import PROMPTS, build_tiny_model


def test_tp2_greedy_equals_tp1(tmp_path):
    # Untied head and MLP/attention biases exercise every sharded parameter kind.
    path = str(build_tiny_model(tmp_path, tie_word_embeddings=False, attention_bias=True, mlp_bias=True))
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    results = {}
    for tp in (1, 2):
        llm = LLM(path, tensor_parallel_size=tp, max_num_seqs=4)
        try:
            results[tp] = [o.output.token_ids for o in llm.generate(PROMPTS, params)]
        finally:
            llm.shutdown()
    assert results[2] == results[1]
    assert all(len(tokens) == 16 for tokens in results[2])


def test_tp2_tree_speculation_equals_plain_greedy(tmp_path):
    """Tree verification under TP: accepted paths are compacted in every rank's KV shard."""
    from specserve.config import ControlConfig, SpeculativeConfig
    from specserve.spec.tree import TreeBudget

    path = str(build_tiny_model(tmp_path))
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    plain = LLM(path, max_num_seqs=4)
    spec = LLM(path, tensor_parallel_size=2, max_num_seqs=4,
               speculative=SpeculativeConfig(draft_model=path, budget=TreeBudget(depth=3, width=2)),
               control=ControlConfig(policy="fixed"))
    try:
        expected = [o.output.token_ids for o in plain.generate(PROMPTS, params)]
        assert [o.output.token_ids for o in spec.generate(PROMPTS, params)] == expected
        assert spec.engine.spec_stats.accepted > 0
    finally:
        plain.shutdown()
        spec.shutdown()


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_tp2_over_ray_actors_equals_tp1(tmp_path, local_ray):
    """Rank 1 as a Ray actor in a placement group gives the same greedy tokens as TP=1."""
    path = str(build_tiny_model(tmp_path))
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    results = {}
    for tp, backend in ((1, "process"), (2, "ray")):
        llm = LLM(path, tensor_parallel_size=tp, worker_backend=backend, max_num_seqs=4)
        try:
            results[tp] = [o.output.token_ids for o in llm.generate(PROMPTS, params)]
            if backend == "ray":
                assert llm.engine.executor.healthy()
        finally:
            llm.shutdown()
    assert results[2] == results[1]


def test_dead_tp_worker_fails_requests_clearly_and_stops_the_engine(tmp_path, local_ray):
    """Killing rank 1 mid-generation fails the in-flight request with a clear error; the engine
    reports itself dead (a Serve replica's health check then replaces it) and refuses new work."""
    path = str(build_tiny_model(tmp_path, max_position_embeddings=1024))
    engine = AsyncLLMEngine(EngineConfig(model=path, tensor_parallel_size=2, worker_backend="ray",
                                         max_num_seqs=2, max_model_len=1024))
    params = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)

    async def run() -> str:
        outputs = 0
        try:
            async for _ in engine.generate("Hello", params):
                outputs += 1
                if outputs == 3:
                    local_ray.kill(engine.engine.executor.workers.actors[0])
        except RuntimeError as exc:
            return str(exc)
        return "finished"

    try:
        error = asyncio.run(run())
        assert error.startswith("step failed") and "by peer" in error  # reset or closed
        deadline = time.monotonic() + 30
        while engine.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not engine.is_alive()

        async def late():
            async for _ in engine.generate("Hi", SamplingParams(max_tokens=2)):
                pass
        with pytest.raises(RuntimeError, match="tensor-parallel group failed"):
            asyncio.run(late())
    finally:
        engine.shutdown()


def test_a_worker_that_stops_answering_fails_the_step_within_the_collective_timeout(tmp_path):
    """A hung rank 1 (stopped, its connection still open) fails rank 0's step after
    ``collective_timeout_s`` instead of hanging it, and the engine stops for good."""
    path = str(build_tiny_model(tmp_path))
    engine = AsyncLLMEngine(EngineConfig(model=path, tensor_parallel_size=2, max_num_seqs=2,
                                         max_model_len=256, collective_timeout_s=2.0))
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    async def run() -> str:
        try:
            async for _ in engine.generate("Hello", params):
                pass
        except RuntimeError as exc:
            return str(exc)
        return "finished"

    worker = engine.engine.executor.workers.procs[0]
    try:
        assert asyncio.run(run()) == "finished"
        os.kill(worker.pid, signal.SIGSTOP)
        start = time.monotonic()
        error = asyncio.run(run())
        assert error.startswith("step failed") and "Timed out" in error
        assert time.monotonic() - start < 30
        deadline = time.monotonic() + 10
        while engine.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not engine.is_alive() and not engine.engine.executor.healthy()
    finally:
        os.kill(worker.pid, signal.SIGCONT)
        engine.shutdown()
