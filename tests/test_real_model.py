"""The embedded default model (SmolLM2-135M-Instruct) against HF transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from specserve.engine.sampling_params import SamplingParams
from specserve.llm import LLM
from test_engine import hf_greedy

pytestmark = pytest.mark.real_model

QUESTIONS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain photosynthesis in one sentence.",
    "List three colours of the rainbow.",
]


@pytest.fixture(scope="module")
def llm(default_model_path):
    llm = LLM(str(default_model_path), max_num_seqs=8, max_model_len=512)
    yield llm
    llm.shutdown()


def test_greedy_tokens_equal_hf(llm, default_model_path):
    hf = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    outputs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS], params)
    for out in outputs:
        ids = torch.tensor([out.prompt_token_ids])
        assert out.output.token_ids == hf_greedy(hf, ids, 32)


def test_batched_equals_single_and_slots_are_freed(llm):
    params = SamplingParams(max_tokens=32, temperature=0.0)
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    batched = [o.output.token_ids for o in llm.chat(conversations, params)]
    single = [llm.chat(c, params)[0].output.token_ids for c in conversations]
    assert batched == single
    engine = llm.engine
    assert engine.scheduler.slots.num_free == engine.config.max_num_seqs


def test_seeded_sampling_is_reproducible(llm):
    conversation = [{"role": "user", "content": "Tell me a story about a dragon."}]
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=11)
    first = llm.chat(conversation, params)[0].output.token_ids
    assert llm.chat(conversation, params)[0].output.token_ids == first
    other = llm.chat(conversation, SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=12))
    assert other[0].output.token_ids != first


def test_speculative_greedy_with_the_committed_draft_equals_plain_greedy(llm, default_model_path):
    from specserve.config import ControlConfig, SpeculativeConfig
    from specserve.spec.tree import TreeBudget

    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    plain = [o.output.token_ids for o in llm.chat(conversations, params)]
    spec = LLM(str(default_model_path), max_num_seqs=8, max_model_len=512,
               speculative=SpeculativeConfig(budget=TreeBudget(depth=5, width=2, max_nodes=8)),
               control=ControlConfig(policy="fixed"))
    try:
        outputs = spec.chat(conversations, params)
        assert [o.output.token_ids for o in outputs] == plain
        stats = spec.engine.spec_stats
        assert stats.accepted > 0 and stats.mean_accepted_tokens > 1.2
    finally:
        spec.shutdown()
