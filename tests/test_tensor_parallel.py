"""TP=2 on CPU (two processes over gloo) gives the same greedy tokens as TP=1."""

from __future__ import annotations

from specserve.config import EngineConfig
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
