"""Padded graph steps against the eager forward: same logits, same cache, on CPU (the padded step
run eagerly) and, where there is a GPU, replayed as CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from specserve.config import ControlConfig, EngineConfig, SpeculativeConfig
from specserve.distributed.parallel_state import SINGLE_PROCESS
from specserve.engine.llm_engine import LLMEngine
from specserve.models.cuda_graphs import MASK_WINDOW, GraphedForward
from specserve.models.forward_batch import SequenceSlice, build_step_inputs
from specserve.models.kv_cache import KVCache
from specserve.models.linear_kernel import KernelPlan, WeightLayout
from specserve.models.loader import load_model
from specserve.spec.tree import TreeBudget
from test_engine import GREEDY, run
from tiny_models import PROMPTS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SLOTS, MAX_LEN = 6, 256


def _setup(path, device: str):
    device = torch.device(device)
    model, _ = load_model(
        path, SINGLE_PROCESS, torch.float32, device, MAX_LEN, KernelPlan.single(WeightLayout.OUTPUT_MAJOR)
    )
    arch = model.arch

    def cache(slots: int) -> KVCache:
        return KVCache(arch.num_layers, slots, arch.num_kv_heads, MAX_LEN, arch.head_dim, torch.float32, device)

    eager_cache, graph_cache = cache(SLOTS), cache(SLOTS + 1)
    graphs = GraphedForward(
        model, graph_cache, num_slots=SLOTS, max_model_len=MAX_LEN,
        max_tokens=64, device=device, capture=device.type == "cuda",
    )
    return model, eager_cache, graph_cache, graphs


def _eager(model, cache, seqs):
    step = build_step_inputs(seqs, model.heads_per_kv, torch.float32, cache.keys[0].device)
    with torch.inference_mode():
        return model.logits(model.hidden_states(step, cache), step.logits_index).cpu()


def _graphed(model, cache, graphs, seqs):
    with torch.inference_mode():
        out = graphs.run(seqs)
        assert out is not None, "the step should fit a bucket"
        return model.logits(*out).cpu()


def _prefill(slot: int, tokens: list[int]) -> SequenceSlice:
    return SequenceSlice(slot, tokens, list(range(len(tokens))), 0, logits_at=[len(tokens) - 1])


@pytest.mark.parametrize("device", DEVICES)
def test_padded_steps_match_the_eager_forward(tiny_model, device):
    model, eager_cache, graph_cache, graphs = _setup(tiny_model, device)
    prompts = {0: [5, 17, 42, 9, 3], 2: [7, 8, 9], 3: list(range(20, 60))}
    for slot, tokens in prompts.items():  # prompts go through the eager path in both
        for cache in (eager_cache, graph_cache):
            _eager(model, cache, [_prefill(slot, tokens)])
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    steps = [
        # a ragged decode batch (slot 1 is free: a padding row inside the bucket)
        [SequenceSlice(0, [11], [5], 5, logits_at=[0]), SequenceSlice(3, [12], [40], 40, logits_at=[0])],
        # a token tree beside a plain decode
        [
            SequenceSlice(0, [21, 22, 23], [6, 7, 6], 6, tree_mask=tree, logits_at=[0, 1, 2]),
            SequenceSlice(2, [13], [3], 3, logits_at=[0]),
        ],
        # a draft-style step: two new nodes whose masked region starts before the cache end
        [SequenceSlice(2, [31, 32], [5, 5], 5, tree_start=4,
                       tree_mask=torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool), logits_at=[0, 1])],
        # a chunk of several causal tokens
        [SequenceSlice(3, [1, 2, 3, 4, 5], list(range(41, 46)), 41, logits_at=[2, 4])],
    ]
    for seqs in steps:
        expected = _eager(model, eager_cache, seqs)
        torch.testing.assert_close(_graphed(model, graph_cache, graphs, seqs), expected, atol=1e-4, rtol=1e-4)
    for layer in range(len(eager_cache.keys)):  # real slots hold the same K/V; padding wrote nowhere else
        torch.testing.assert_close(graph_cache.keys[layer][:SLOTS], eager_cache.keys[layer])
        torch.testing.assert_close(graph_cache.values[layer][:SLOTS], eager_cache.values[layer])
    if device == "cuda":
        assert graphs.num_graphs == len(steps)


def test_steps_outside_every_bucket_run_eagerly(tiny_model):
    *_, graphs = _setup(tiny_model, "cpu")
    assert graphs.bucket([_prefill(0, list(range(40)))]) is None  # too many tokens in a row
    wide = SequenceSlice(0, [1], [100], 100, tree_start=100 - MASK_WINDOW,
                         tree_mask=torch.ones(1, MASK_WINDOW + 1, dtype=torch.bool))
    assert graphs.bucket([wide]) is None  # mask region wider than the window
    assert graphs.bucket([SequenceSlice(5, [1], [200], 200)]) == (SLOTS, 1, MAX_LEN)
    assert graphs.bucket([SequenceSlice(1, [1, 2, 3], [9, 10, 11], 9)]) == (2, 4, 128)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("speculative", [False, True])
def test_engine_output_is_the_same_with_and_without_graphs(tiny_model, speculative):
    spec = SpeculativeConfig(draft_model=str(tiny_model), budget=TreeBudget(depth=3, width=2)) if speculative else None
    outputs = []
    for eager in (True, False):
        engine = LLMEngine(EngineConfig(
            model=str(tiny_model), dtype="float32", max_num_seqs=8, max_model_len=256, enforce_eager=eager,
            speculative=spec, control=ControlConfig(policy="fixed"),
        ))
        try:
            outputs.append([o.output.token_ids for o in run(engine, PROMPTS, GREEDY, stagger=2)])
            if not eager:
                assert engine.executor.runner.graphs.num_graphs > 0
        finally:
            engine.shutdown()
    assert outputs[0] == outputs[1]
