"""The engine on a tiny random model: exactness, batching, sampling, stops, errors, slots."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from specserve.config import ControlConfig, EngineConfig, SpeculativeConfig
from specserve.engine.async_engine import AsyncLLMEngine
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.request import FinishReason
from specserve.engine.sampling_params import SamplingParams
from specserve.spec.tree import TreeBudget
from tiny_models import PROMPTS

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def run(engine: LLMEngine, prompts, params, stagger: int = 0):
    """Run prompts to completion; with ``stagger`` a new request joins every N steps."""
    pending = [engine.make_request(f"r{i}", p, params[i] if isinstance(params, list) else params)
               for i, p in enumerate(prompts)]
    finals, steps = {}, 0
    while pending or engine.has_unfinished_requests():
        if pending and (stagger == 0 or steps % stagger == 0):
            for request in pending if stagger == 0 else pending[:1]:
                engine.add_request(request)
            pending = [] if stagger == 0 else pending[1:]
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        steps += 1
    return [finals[f"r{i}"] for i in range(len(prompts))]


@torch.inference_mode()
def hf_greedy(hf, ids: torch.Tensor, n: int) -> list[int]:
    """Greedy continuation by HF's own forward (no generate() logits processors)."""
    for _ in range(n):
        ids = torch.cat([ids, hf(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, -n:].tolist()


def assert_all_slots_free(engine: LLMEngine) -> None:
    assert engine.scheduler.slots.num_free == engine.config.max_num_seqs
    assert not engine.requests and not engine.has_unfinished_requests()


def test_greedy_equals_hf_generate(tiny_model):
    """In float32 on any device (on a GPU the default is bf16, whose argmax may flip)."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model), max_num_seqs=8, max_model_len=256, dtype="float32"))
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    outs = run(engine, PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        ids = engine.tokenizer(prompt, return_tensors="pt").input_ids
        assert out.output.token_ids == hf_greedy(hf, ids, 24)
    assert_all_slots_free(engine)


def test_batched_equals_single_with_chunked_prefill_and_staggered_arrivals(tiny_model):
    single = [run(LLMEngine(EngineConfig(model=str(tiny_model), max_num_seqs=1)), [p], GREEDY)[0]
              for p in PROMPTS]
    # A tiny token budget forces chunked prefill beside other requests' decodes.
    engine = LLMEngine(EngineConfig(model=str(tiny_model), max_num_seqs=3, max_num_batched_tokens=16))
    batched = run(engine, PROMPTS * 2, GREEDY, stagger=3)
    for i, out in enumerate(batched):
        assert out.output.token_ids == single[i % len(PROMPTS)].output.token_ids
    assert_all_slots_free(engine)


@torch.inference_mode()
def hf_prompt_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, V]: the log-probabilities the model gives each prompt token's successor."""
    return hf(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)


@pytest.mark.parametrize("speculative", [False, True])
def test_prompt_logprobs_equal_a_whole_prompt_forward_across_chunks_and_batches(tiny_model, speculative):
    """Prompts prefilled in 16-token chunks beside other requests' decodes (and, speculating,
    beside verified trees) score every prompt token as one forward over the whole prompt does;
    what they generate is what plain greedy decoding generates."""
    spec = dict(
        speculative=SpeculativeConfig(draft_model=str(tiny_model), budget=TreeBudget(depth=3, width=2)),
        control=ControlConfig(policy="fixed"),
    ) if speculative else {}
    engine = LLMEngine(EngineConfig(model=str(tiny_model), max_num_seqs=4, max_num_batched_tokens=16,
                                    dtype="float32", **spec))
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompts = [p * 4 for p in PROMPTS]  # longer than a chunk
    scored = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, prompt_logprobs=3)
    params = [scored, GREEDY.model_copy(update={"max_tokens": 8})] * 3
    outs = run(engine, prompts, params[: len(prompts)], stagger=2)
    plain = run(LLMEngine(EngineConfig(model=str(tiny_model), max_num_seqs=4)), prompts, params[: len(prompts)])
    for out, reference, p in zip(outs, plain, params):
        assert out.output.token_ids == reference.output.token_ids
        if p.prompt_logprobs is None:
            assert out.prompt_logprobs is None
            continue
        ids = out.prompt_token_ids
        expected = hf_prompt_logprobs(hf, ids)
        assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
        for position, (row, token) in enumerate(zip(out.prompt_logprobs[1:], ids[1:])):
            top = expected[position].topk(3)
            assert set(row) == set(top.indices.tolist()) | {token}
            assert row[token] == pytest.approx(expected[position, token].item(), abs=1e-4)
    if speculative:
        assert engine.spec_stats.accepted > 0
    assert_all_slots_free(engine)


def test_max_tokens_0_scores_the_prompt_and_generates_nothing(tiny_engine):
    ids = tiny_engine.tokenizer.encode(PROMPTS[3])
    only_scored, generating = run(tiny_engine, [ids, ids], [
        SamplingParams(max_tokens=0, prompt_logprobs=0),
        SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=0),
    ])
    assert only_scored.output.token_ids == [] and only_scored.output.text == ""
    assert only_scored.output.finish_reason is FinishReason.LENGTH and only_scored.metrics.ttft is not None
    assert only_scored.prompt_logprobs == generating.prompt_logprobs
    assert [len(row) for row in only_scored.prompt_logprobs[1:]] == [1] * (len(ids) - 1)
    assert len(generating.output.token_ids) == 4
    assert_all_slots_free(tiny_engine)


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_engine):
    params = [SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=s) for s in (7, 7, 8)]
    alone = run(tiny_engine, [PROMPTS[0]], [params[0]])[0].output.token_ids
    together = [o.output.token_ids for o in run(tiny_engine, [PROMPTS[0]] * 3, params)]
    assert together[0] == together[1] == alone
    assert together[2] != together[0]


def test_more_requests_than_slots_wait_and_all_finish(tiny_model):
    engine = LLMEngine(EngineConfig(model=str(tiny_model), max_num_seqs=2))
    engine_steps_running = []
    for i, p in enumerate(PROMPTS):
        engine.add_request(engine.make_request(f"r{i}", p, GREEDY))
    finished = 0
    while engine.has_unfinished_requests():
        finished += sum(o.finished for o in engine.step())
        engine_steps_running.append(len(engine.scheduler.running))
    assert finished == len(PROMPTS)
    assert max(engine_steps_running) == 2
    assert_all_slots_free(engine)


def test_a_final_only_request_reports_once_with_what_a_cumulative_one_ends_with(tiny_engine):
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=2, stop=["zz"])
    for kind in ("cumulative", "final_only"):
        tiny_engine.add_request(tiny_engine.make_request(kind, PROMPTS[0], params.model_copy(update={"output_kind": kind})))
    reports = {"cumulative": [], "final_only": []}
    while tiny_engine.has_unfinished_requests():
        for out in tiny_engine.step():
            reports[out.request_id].append(out)
    (final,) = reports["final_only"]
    last = reports["cumulative"][-1]
    assert final.finished and len(reports["cumulative"]) > 1
    assert final.output.text == final.output.delta_text == last.output.text
    assert final.output.token_ids == final.output.delta_token_ids == last.output.token_ids
    # Same tokens; values equal up to float rounding (rows of one batch may take different kernel paths).
    assert [list(row) for row in final.output.logprobs] == [list(row) for row in last.output.logprobs]
    for mine, theirs in zip(final.output.logprobs, last.output.logprobs):
        assert list(mine.values()) == pytest.approx(list(theirs.values()), abs=1e-5)
    assert_all_slots_free(tiny_engine)


def test_a_requests_token_ranges_span_its_prompt_and_output(tiny_engine):
    request = tiny_engine.make_request("ranges", [1, 2, 3], SamplingParams(max_tokens=4))
    request.output_token_ids += [4, 5]
    for start in range(6):
        for end in range(start, 6):
            assert request.tokens_between(start, end) == request.all_token_ids[start:end]


def test_abort_frees_slots(tiny_engine):
    for i in range(3):
        tiny_engine.add_request(tiny_engine.make_request(f"a{i}", PROMPTS[i], GREEDY))
    tiny_engine.step()
    tiny_engine.step()
    out = tiny_engine.abort_request("a1")
    assert out.finished and out.output.finish_reason is FinishReason.ABORT
    tiny_engine.abort_request("a0")
    tiny_engine.abort_request("a2")
    assert tiny_engine.abort_request("a2") is None
    assert_all_slots_free(tiny_engine)


def test_stop_conditions(tiny_engine):
    base = run(tiny_engine, [PROMPTS[2]], GREEDY)[0].output
    stop_text = base.text[5:8]
    out = run(tiny_engine, [PROMPTS[2]], SamplingParams(max_tokens=24, temperature=0, stop=[stop_text], ignore_eos=True))[0]
    assert out.output.finish_reason is FinishReason.STOP
    assert out.output.text == base.text[: base.text.index(stop_text)]
    stop_id = base.token_ids[4]
    out = run(tiny_engine, [PROMPTS[2]], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop_id], ignore_eos=True))[0]
    assert out.output.token_ids == base.token_ids[: base.token_ids.index(stop_id) + 1]
    assert out.output.finish_reason is FinishReason.STOP
    out = run(tiny_engine, [PROMPTS[2]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert len(out.output.token_ids) == 3 and out.output.finish_reason is FinishReason.LENGTH


def test_eos_ends_a_request(tiny_engine):
    tiny_engine.eos_token_ids.add(run(tiny_engine, [PROMPTS[1]], GREEDY)[0].output.token_ids[2])
    try:
        out = run(tiny_engine, [PROMPTS[1]], SamplingParams(max_tokens=24, temperature=0))[0]
    finally:
        tiny_engine.eos_token_ids = {tiny_engine.tokenizer.eos_token_id}
    assert len(out.output.token_ids) == 3 and out.output.finish_reason is FinishReason.STOP


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ("", {}, "prompt must not be empty"),
        ([], {}, "prompt must not be empty"),
        ([1, 10_000], {}, "outside"),
        ("x " * 300, {"max_tokens": 16}, "exceeds the model context"),
        ("hi", {"max_tokens": 256}, "exceeds the model context"),
        ("a\ud800b", {}, "prompt is not valid Unicode text"),  # as JSON's "a\\ud800b" decodes
    ],
)
def test_bad_input_is_a_clear_value_error(tiny_engine, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        tiny_engine.make_request("bad", prompt, SamplingParams(**params))


@pytest.mark.parametrize(
    "params",
    [{"max_tokens": -1}, {"prompt_logprobs": 21}, {"temperature": -0.5}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"seed": 2**64},
     {"logit_bias": {5: 101.0}}, {"logit_bias": {-1: 1.0}}, {"presence_penalty": 2.5}, {"frequency_penalty": -3},
     {"repetition_penalty": 0.0}],
)
def test_bad_sampling_params_are_rejected(params):
    with pytest.raises(ValueError):
        SamplingParams(**params)


def test_unknown_model_path_is_rejected():
    with pytest.raises(ValueError, match="not a directory"):
        EngineConfig(model="/no/such/model")


@pytest.fixture
def async_engine(tiny_engine):
    """An async loop over the shared tiny engine, stopped after the test so that its thread
    never steps the engine under a later test."""
    engine = AsyncLLMEngine(engine=tiny_engine)
    yield engine
    engine.stop()
    assert not engine.is_alive()


def test_a_stream_whose_event_loop_closed_is_aborted_and_the_engine_goes_on(tiny_engine, async_engine):
    gone = asyncio.new_event_loop()  # a caller that closes its loop mid-stream, never closing the stream
    stream = async_engine.generate(PROMPTS[0], SamplingParams(max_tokens=200, temperature=0))
    gone.run_until_complete(anext(stream))
    gone.close()

    async def after():
        return [out async for out in async_engine.generate(PROMPTS[3], GREEDY)][-1]

    assert asyncio.run(asyncio.wait_for(after(), 60)).finished and async_engine.is_alive()
    for _ in range(100):  # the engine thread aborts the orphan at its next delivery
        if async_engine.num_requests == 0 and not tiny_engine.has_unfinished_requests():
            break
        time.sleep(0.02)
    assert_all_slots_free(tiny_engine)


def test_failed_forward_fails_its_batch_and_the_engine_goes_on(tiny_engine, monkeypatch):
    tiny_engine.add_request(tiny_engine.make_request("doomed", PROMPTS[0], GREEDY))
    original = tiny_engine.executor.call
    monkeypatch.setattr(tiny_engine.executor, "call", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    [out] = tiny_engine.step()
    assert out.finished and out.output.finish_reason is FinishReason.ERROR and "boom" in out.error
    monkeypatch.setattr(tiny_engine.executor, "call", original)
    assert_all_slots_free(tiny_engine)
    assert run(tiny_engine, [PROMPTS[0]], GREEDY)[0].output.finish_reason is FinishReason.LENGTH


def test_failed_step_fails_the_requests_it_ran_not_the_waiting_ones(tiny_engine, monkeypatch):
    slots = tiny_engine.config.max_num_seqs
    for i in range(slots + 1):  # one more than there are slots: it waits
        tiny_engine.add_request(tiny_engine.make_request(f"q{i}", PROMPTS[i % len(PROMPTS)], GREEDY))
    original = tiny_engine._next_tokens
    monkeypatch.setattr(tiny_engine, "_next_tokens", lambda *a: (_ for _ in ()).throw(RuntimeError("no picks")))
    failed = tiny_engine.step()
    assert len(failed) == slots and all("step failed: no picks" in out.error for out in failed)
    monkeypatch.setattr(tiny_engine, "_next_tokens", original)
    finals = {}
    while tiny_engine.has_unfinished_requests():
        finals.update({out.request_id: out for out in tiny_engine.step() if out.finished})
    assert finals.keys() == {f"q{slots}"} and finals[f"q{slots}"].output.finish_reason is FinishReason.LENGTH
    assert_all_slots_free(tiny_engine)


def test_a_request_that_cannot_take_its_token_fails_alone(tiny_engine, monkeypatch):
    original = tiny_engine._append_token

    def append(request, token, now, logprobs):
        if request.request_id == "r1" and len(request.output_token_ids) == 3:
            raise RuntimeError("structured output refused token")
        original(request, token, now, logprobs)

    alone = run(tiny_engine, PROMPTS[:3], GREEDY)
    monkeypatch.setattr(tiny_engine, "_append_token", append)
    outs = run(tiny_engine, PROMPTS[:3], GREEDY)
    assert outs[1].output.finish_reason is FinishReason.ERROR and "refused token" in outs[1].error
    assert len(outs[1].output.token_ids) == 3
    assert [o.output.token_ids for o in (outs[0], outs[2])] == [o.output.token_ids for o in (alone[0], alone[2])]
    assert_all_slots_free(tiny_engine)


def test_failed_planning_decodes_without_speculation(tiny_model, monkeypatch):
    spec = SpeculativeConfig(method="ngram", budget=TreeBudget(depth=3, width=2))
    engine = LLMEngine(EngineConfig(model=str(tiny_model), max_num_seqs=4, max_model_len=256, speculative=spec,
                                    control=ControlConfig(policy="fixed")))
    plain = [o.output.token_ids for o in run(engine, PROMPTS, GREEDY)]
    steps = engine.spec_stats.steps
    assert steps > 0
    monkeypatch.setattr(engine.controller, "plan", lambda step: (_ for _ in ()).throw(ValueError("bad plan")))
    assert [o.output.token_ids for o in run(engine, PROMPTS, GREEDY)] == plain
    assert engine.spec_stats.steps == steps  # nothing was verified
    assert_all_slots_free(engine)


def test_async_streaming_and_abort(tiny_engine, async_engine):

    async def main():
        deltas, final = [], None
        async for out in async_engine.generate(PROMPTS[3], GREEDY):
            deltas.append(out.output.delta_text)
            final = out
        assert final.finished and "".join(deltas) == final.output.text
        assert len(final.metrics.token_times) == 24 and final.metrics.ttft > 0

        async def partial():  # a client that stops reading after 3 tokens
            async for out in async_engine.generate(PROMPTS[0], SamplingParams(max_tokens=200, temperature=0)):
                if len(out.output.token_ids) >= 3:
                    return

        await asyncio.gather(partial(), partial())
        with pytest.raises(ValueError, match="empty"):
            async for _ in async_engine.generate("", GREEDY):
                pass
        for _ in range(100):  # aborts are applied by the engine thread
            if tiny_engine.scheduler.slots.num_free == tiny_engine.config.max_num_seqs:
                break
            await asyncio.sleep(0.02)

    asyncio.run(main())
    assert_all_slots_free(tiny_engine)
