"""The engine loop in a process of its own: the same outputs as in a thread, errors where the
caller sees them, aborts, and requests that fail clearly when the engine process dies."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

from specserve.config import EngineConfig, SpeculativeConfig
from specserve.engine import async_engine
from specserve.engine.async_engine import AsyncLLMEngine
from specserve.engine.engine_loop import EngineLoop, NewRequest
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.request import FinishReason
from specserve.engine.sampling_params import SamplingParams, StructuredOutput

PROMPTS = ["Hello there", "The quick brown fox", "Once upon a time, in a land", "A"]


@pytest.fixture(scope="module")
def config(tiny_model) -> EngineConfig:
    return EngineConfig(model=str(tiny_model), max_num_seqs=4, max_model_len=256,
                        speculative=SpeculativeConfig(method="ngram"))


@pytest.fixture(scope="module")
def engines(config):
    """The same config driven in a thread and in a process of its own."""
    threaded, separate = AsyncLLMEngine(config), AsyncLLMEngine(config, own_process=True, torch_threads=1)
    yield threaded, separate
    threaded.shutdown()
    separate.shutdown()


async def _final(engine: AsyncLLMEngine, prompt, params: SamplingParams):
    outputs = [output async for output in engine.generate(prompt, params)]
    return outputs[-1]


def _run_all(engine: AsyncLLMEngine, requests: list[tuple[str, SamplingParams]]):
    async def run():
        return await asyncio.gather(*(_final(engine, prompt, params) for prompt, params in requests))
    return asyncio.run(asyncio.wait_for(run(), 120))


def test_outputs_equal_those_of_the_engine_in_a_thread(engines):
    requests = [(p, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)) for p in PROMPTS]
    requests.append((PROMPTS[0], SamplingParams(max_tokens=16, temperature=0.8, seed=7, logprobs=2)))
    requests.append((PROMPTS[1], SamplingParams(max_tokens=12, temperature=0.0,
                                                structured=StructuredOutput(regex="[a-z]{2,8}!"))))
    threaded, separate = (_run_all(engine, requests) for engine in engines)
    for mine, theirs in zip(separate, threaded, strict=True):  # rebuilt from the first output and deltas
        assert mine.finished and mine.output.token_ids == theirs.output.token_ids
        assert mine.output.text == theirs.output.text and mine.output.finish_reason == theirs.output.finish_reason
        assert len(mine.metrics.token_times) == len(mine.output.token_ids) == len(theirs.metrics.token_times)
    assert separate[-2].output.logprobs is not None and len(separate[-2].output.logprobs) == 16
    assert separate[-1].output.text.endswith("!")
    assert engines[1].spec_stats().steps > 0  # the ngram drafter ran there, and its totals came back


def test_bad_input_raises_at_once_and_a_bad_grammar_from_the_engine_process(engines):
    separate = engines[1]
    with pytest.raises(ValueError, match="exceeds the model context"):
        _run_all(separate, [(PROMPTS[0], SamplingParams(max_tokens=1000))])
    with pytest.raises(ValueError, match="outside"):
        _run_all(separate, [([0, 10_000], SamplingParams(max_tokens=2))])
    with pytest.raises(ValueError):  # compiled in the engine process, failed back to its caller
        _run_all(separate, [(PROMPTS[0], SamplingParams(max_tokens=4, structured=StructuredOutput(regex="(open")))])
    assert separate.is_alive() and separate.inputs.max_model_len == 256


def test_a_request_that_cannot_be_made_fails_alone(tiny_engine, monkeypatch):
    """Whatever making a request raises in the engine loop fails that request, not the loop."""
    class Ends:
        def __init__(self, commands):
            self.commands, self.errors, self.reason = commands, [], "running"

        def take(self, wait):
            commands, self.commands = self.commands, [("stop", None)]
            return commands

        def outputs(self, outputs):
            pass

        def error(self, request_id, exc):
            self.errors.append((request_id, exc))

        def stopped(self, reason):
            self.reason = reason

    def broken(*args):
        raise TypeError("compiler crashed")

    monkeypatch.setattr(tiny_engine, "make_request", broken)
    ends = Ends([("add", NewRequest("r", [1, 2], SamplingParams(max_tokens=2), time.monotonic()))])
    EngineLoop(tiny_engine, ends, ends).run()
    [(request_id, exc)] = ends.errors
    assert request_id == "r" and isinstance(exc, RuntimeError) and "compiler crashed" in str(exc)
    assert ends.reason is None and not tiny_engine.has_unfinished_requests()


def test_leaving_a_stream_aborts_its_request(engines):
    separate = engines[1]

    async def leave_early():
        async for _ in separate.generate(PROMPTS[2], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)):
            break

    asyncio.run(leave_early())
    deadline = time.monotonic() + 30
    while separate.load().running and time.monotonic() < deadline:  # the idle engine reports its load
        time.sleep(0.05)
    assert separate.load().running == 0 and separate.num_requests == 0


def test_abort_ends_the_stream_with_an_abort_output(engines):
    for engine in engines:
        async def aborted():
            outputs = []
            async for output in engine.generate(PROMPTS[1], SamplingParams(max_tokens=200, ignore_eos=True),
                                                request_id="to-abort"):
                outputs.append(output)
                if len(outputs) == 1:
                    engine.abort("to-abort")
            return outputs

        outputs = asyncio.run(asyncio.wait_for(aborted(), 60))
        assert outputs[-1].finished and outputs[-1].output.finish_reason is FinishReason.ABORT
        assert len(outputs[-1].output.token_ids) < 200


def test_a_dead_engine_process_fails_its_requests_clearly(config):
    engine = AsyncLLMEngine(config, own_process=True, torch_threads=1)

    async def killed_mid_stream() -> str:
        try:
            async for _ in engine.generate(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True)):
                os.kill(engine.pid, signal.SIGKILL)
        except RuntimeError as exc:
            return str(exc)
        return "finished"

    try:
        assert "engine process exited" in asyncio.run(asyncio.wait_for(killed_mid_stream(), 60))
        assert not engine.is_alive()
        with pytest.raises(RuntimeError, match="engine has stopped"):
            _run_all(engine, [(PROMPTS[1], SamplingParams(max_tokens=2))])
    finally:
        engine.shutdown()


def test_an_engine_process_that_cannot_start_says_why(tmp_path):
    with pytest.raises(RuntimeError, match="failed to start"):
        AsyncLLMEngine(EngineConfig(model=str(tmp_path)), own_process=True)


def test_an_engine_made_for_a_thread_is_made_in_it(config, monkeypatch, tmp_path):
    """All of the engine's torch work on one thread: a second thread running OpenMP regions makes
    libgomp stop spinning its idle threads (see EngineThread). A failure to make it still raises
    to the caller."""
    made_on = []

    class RecordingEngine(LLMEngine):
        def __init__(self, *args, **kwargs):
            made_on.append(threading.current_thread().name)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(async_engine, "LLMEngine", RecordingEngine)
    engine = AsyncLLMEngine(config)
    try:
        assert made_on == ["specserve-engine"]
        final = _run_all(engine, [(PROMPTS[0], SamplingParams(max_tokens=4, ignore_eos=True))])[0]
        assert len(final.output.token_ids) == 4
    finally:
        engine.shutdown()
    with pytest.raises(ValueError, match="no config.json"):
        AsyncLLMEngine(EngineConfig(model=str(tmp_path)))
    assert made_on[-1] == "specserve-engine"
