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
