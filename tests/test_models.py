"""Our Llama-family forward against HF transformers on tiny random models."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from specserve.distributed.parallel_state import SINGLE_PROCESS
from specserve.models import forward_batch
from specserve.models.forward_batch import SequenceSlice, attention_groups, build_step_inputs
from specserve.models.kv_cache import KVCache
from specserve.models import linear_kernel
from specserve.models.linear_kernel import (
    KernelPlan, PlannedWeight, WeightLayout, available_layouts, fastest_plan, measure_plan,
)
from specserve.models.loader import ModelFiles, load_model

from tiny_models import build_tiny_model

VARIANTS = {
    "llama": {},
    "qwen2_qkv_bias": {"model_type": "qwen2", "use_sliding_window": False},
    "mistral_untied": {"model_type": "mistral", "tie_word_embeddings": False, "sliding_window": 4096},
    "llama3_rope_scaling": {
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    },
    "linear_rope_scaling": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "attention_bias": {"attention_bias": True},
}


OUTPUT, INPUT, ONEDNN = WeightLayout.OUTPUT_MAJOR, WeightLayout.INPUT_MAJOR, WeightLayout.ONEDNN_PACKED
PLANS = {
    "output_major": KernelPlan.single(OUTPUT),
    "input_major": KernelPlan.single(INPUT),
    "mixed": KernelPlan(one_row=INPUT, many_rows=OUTPUT),
    "onednn_packed": KernelPlan.single(ONEDNN),
    "onednn_for_one_row": KernelPlan(one_row=ONEDNN, many_rows=OUTPUT),
}


def _ours(path, plan=PLANS["output_major"]):
    model, max_len = load_model(path, SINGLE_PROCESS, torch.float32, torch.device("cpu"), None, plan)
    arch = model.arch
    cache = KVCache(arch.num_layers, 4, arch.num_kv_heads, max_len, arch.head_dim, torch.float32, torch.device("cpu"))
    return model, cache


def _step(model, cache, seqs):
    step = build_step_inputs(seqs, model.heads_per_kv, torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        return model.logits(model.hidden_states(step, cache), step.logits_index)


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_hf_for_prefill_and_decode(tmp_path, variant, plan):
    path = build_tiny_model(tmp_path, **VARIANTS[variant])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model, cache = _ours(path, PLANS[plan])
    ids = torch.randint(0, 384, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = hf(ids).logits
    # Sequence 0: prefill 12 tokens in one chunk, then decode one token at a time.
    # Sequence 1 (another slot) prefills 5 tokens beside it, then 15 more in one chunk.
    out = _step(model, cache, [
        SequenceSlice(3, ids[0, :12].tolist(), list(range(12)), 0, logits_at=list(range(12))),
        SequenceSlice(1, ids[1, :5].tolist(), list(range(5)), 0, logits_at=[4]),
    ])
    torch.testing.assert_close(out[:12], ref[0, :12], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[12], ref[1, 4], atol=1e-4, rtol=1e-4)
    out = _step(model, cache, [
        SequenceSlice(1, ids[1, 5:].tolist(), list(range(5, 20)), 5, logits_at=list(range(15))),
        SequenceSlice(3, [int(ids[0, 12])], [12], 12, logits_at=[0]),
    ])
    torch.testing.assert_close(out[:15], ref[1, 5:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[15], ref[0, 12], atol=1e-4, rtol=1e-4)
    for i in range(13, 20):
        out = _step(model, cache, [SequenceSlice(3, [int(ids[0, i])], [i], i, logits_at=[0])])
        torch.testing.assert_close(out[0], ref[0, i], atol=1e-4, rtol=1e-4)


def test_planned_weight_multiplies_each_row_count_in_its_layout():
    weight, bias = torch.randn(6, 4), torch.randn(6)
    planned = PlannedWeight(weight, KernelPlan(one_row=INPUT, many_rows=OUTPUT))
    assert planned.stored[INPUT].shape == (4, 6) and planned.stored[OUTPUT] is weight
    for rows in (1, 3):
        x = torch.randn(rows, 4)
        torch.testing.assert_close(planned(x, bias), x @ weight.t() + bias)
    assert list(PlannedWeight(weight, KernelPlan.single(INPUT)).stored) == [INPUT]


@pytest.mark.skipif(not linear_kernel.int8_available("cpu"), reason="this PyTorch build has no fbgemm")
def test_int8_weights_multiply_close_to_float32_and_are_never_measured_into_a_plan():
    """Per-channel int8 weights with per-call int8 activations (a draft model's layout): about
    1 % of the output's scale off float32, whatever the row count, and never an exact layout."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator) * torch.linspace(0.01, 1.0, 96).unsqueeze(1)
    bias = torch.randn(96, generator=generator)
    planned = PlannedWeight(weight, KernelPlan.single(WeightLayout.INT8_DYNAMIC))
    for shape in ((1, 64), (7, 64), (2, 3, 64)):
        x = torch.randn(*shape, generator=generator)
        exact = torch.nn.functional.linear(x, weight, bias)
        error = (planned(x, bias) - exact).abs().max() / (exact - bias).abs().max()
        assert error < 0.03
    assert WeightLayout.INT8_DYNAMIC not in available_layouts("cpu")
    assert not linear_kernel.int8_available("cuda")


def test_onednn_packed_weights_give_each_row_the_same_result_in_any_batch():
    """The packed layout multiplies as F.linear does, and a row's result does not depend on how
    many rows share the step (a verified tree's logits match the plain decode step's)."""
    weight, bias = torch.randn(40, 24), torch.randn(40)
    planned = PlannedWeight(weight, KernelPlan.single(ONEDNN))
    x = torch.randn(9, 24)
    together = planned(x, bias)
    torch.testing.assert_close(together, torch.nn.functional.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
    for rows in (1, 2, 5):
        assert torch.equal(planned(x[:rows], bias), together[:rows])
    assert planned(x.reshape(3, 3, 24), None).shape == (3, 3, 40)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_on_the_cpu_get_a_plan_for_their_dtype(tiny_model, dtype, tmp_path, monkeypatch):
    """oneDNN packs bfloat16 and float16 weights only where the CPU has the instructions; the
    plan is measured in the model's dtype, so it never picks a layout the CPU cannot run."""
    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path))
    plans = functools.partial(fastest_plan, "cpu", dtype=dtype)
    model, max_len = load_model(tiny_model, SINGLE_PROCESS, dtype, torch.device("cpu"), None, plans)
    assert all(set(m.kernel.plan.layouts) <= set(available_layouts("cpu", dtype)) for m in model.modules()
               if getattr(m, "kernel", None) is not None)
    arch = model.arch
    cache = KVCache(arch.num_layers, 2, arch.num_kv_heads, max_len, arch.head_dim, dtype, torch.device("cpu"))
    prompt = [SequenceSlice(0, list(range(3, 11)), list(range(8)), 0, logits_at=[7])]
    step = build_step_inputs(prompt, model.heads_per_kv, dtype, torch.device("cpu"))
    with torch.inference_mode():
        logits = model.logits(model.hidden_states(step, cache), step.logits_index)
    torch.testing.assert_close(logits.float(), _step(*_ours(tiny_model), prompt), atol=0.1, rtol=0.05)


def test_each_weight_shape_gets_its_own_plan(tiny_model, tmp_path, monkeypatch):
    def by_shape(shape):  # the vocabulary head one way, every other weight the other
        return PLANS["input_major"] if shape[0] == 384 else PLANS["output_major"]

    model, _ = _ours(tiny_model, by_shape)
    head = model.lm_head.kernel.stored
    assert list(head) == [INPUT] and head[INPUT].shape[1] == 384
    assert all(list(m.kernel.stored) == [OUTPUT] for m in model.modules()
               if getattr(m, "kernel", None) is not None and m is not model.lm_head)

    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(linear_kernel, "measure_plan", lambda shape, dtype: (PLANS["mixed"], {}))
    assert fastest_plan("cpu", (12, 5)) == PLANS["mixed"]
    layouts = "+".join(layout.value for layout in available_layouts("cpu"))  # a new layout is measured anew
    cached = json.loads((tmp_path / linear_kernel.KERNEL_PLANS_FILE).read_text())
    assert any(key.endswith(f"|{layouts}|12x5") for key in cached)


def test_kernel_plan_is_measured_for_one_row_two_and_several():
    plan, seconds = measure_plan(megabytes=4, repeats=1)  # float32
    assert set(plan.layouts) <= set(available_layouts("cpu"))
    assert set(seconds) == {f"{layout.value}/{rows}" for layout in available_layouts("cpu") for rows in (1, 2, 4, 16)}
    assert all(s > 0 for s in seconds.values())
    one_row = seconds[f"{plan.one_row.value}/{2 if plan.one_row_as_two else 1}"]
    assert one_row == min(seconds[f"{layout.value}/{rows}"] for layout in available_layouts("cpu") for rows in (1, 2))
    assert seconds[f"{plan.two_rows.value}/2"] == min(seconds[f"{layout.value}/2"] for layout in available_layouts("cpu"))


def test_a_plan_runs_one_row_as_two_and_two_rows_in_their_own_layout(monkeypatch):
    """A one-row step multiplied as two rows (the row twice) gives that row's result, in any
    leading shape; two-row steps take their own layout, others the many-rows one."""
    weight, bias = torch.randn(6, 4), torch.randn(6)
    plan = KernelPlan(one_row=OUTPUT, many_rows=INPUT, two_rows=OUTPUT, one_row_as_two=True)
    planned = PlannedWeight(weight, plan)
    assert list(planned.stored) == [OUTPUT, INPUT]
    calls = []
    original = linear_kernel.linear

    def spy(x, stored, bias, layout):
        calls.append((x.shape[0], layout))
        return original(x, stored, bias, layout)

    monkeypatch.setattr(linear_kernel, "linear", spy)
    for shape in ((1, 4), (1, 1, 4), (2, 4), (5, 4)):
        x = torch.randn(*shape)
        torch.testing.assert_close(planned(x, bias), torch.nn.functional.linear(x, weight, bias))
    assert calls == [(2, OUTPUT), (2, OUTPUT), (2, OUTPUT), (5, INPUT)]
    assert KernelPlan.from_json(plan.to_json()) == plan
    assert KernelPlan.single(ONEDNN).layouts == (ONEDNN,)


def test_tree_mask_scores_each_branch_like_its_own_sequence(tiny_model):
    """Two branches after a shared prefix, verified in one step with a tree mask."""
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    model, cache = _ours(tiny_model)
    prefix, branch_a, branch_b = [5, 17, 42, 9], [100, 101], [200, 201, 202]
    _step(model, cache, [SequenceSlice(0, prefix, list(range(4)), 0)])
    # Nodes: a0 a1 b0 b1 b2; a1 sees a0, b_i see b_<i; positions are 4 + depth.
    tree = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    out = _step(model, cache, [SequenceSlice(
        0, branch_a + branch_b, [4, 5, 4, 5, 6], 4, tree_mask=tree, logits_at=list(range(5)),
    )])
    with torch.inference_mode():
        ref_a = hf(torch.tensor([prefix + branch_a])).logits[0, 4:]
        ref_b = hf(torch.tensor([prefix + branch_b])).logits[0, 4:]
    torch.testing.assert_close(out[:2], ref_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[2:], ref_b, atol=1e-4, rtol=1e-4)


def _slices(lengths: list[int], context: int) -> list[SequenceSlice]:
    return [
        SequenceSlice(slot, [7] * n, list(range(context, context + n)), context) for slot, n in enumerate(lengths)
    ]


def test_a_lone_tree_gets_its_own_attention_call_and_like_steps_share_one():
    groups = attention_groups(_slices([1] * 5 + [9] + [1] * 10, context=256))
    assert sorted(groups) == [[0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [5]]  # padding slot 5 once is cheaper
    groups = attention_groups(_slices([1] * 5 + [9] + [1] * 10, context=1024))
    assert sorted(groups) == [[0, 1, 2, 3, 4], [5], [6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]  # than a call, until keys are long
    assert attention_groups(_slices([3] * 16, context=512)) == [list(range(16))]
    assert attention_groups(_slices([5, 1] * 8, context=512)) == [list(range(16))]  # padding beats 16 calls
    prefill = attention_groups(_slices([1, 1, 300, 1], context=0))
    assert sorted(prefill) == [[0, 1, 3], [2]]
    assert attention_groups([]) == []


def test_splitting_a_step_into_attention_calls_keeps_every_logit(tiny_model, monkeypatch):
    """Decodes and a tree in separate calls score exactly as in one padded call."""
    prefixes = [[5, 17, 42], [9, 8, 7, 6, 5], [11, 12], [3, 4, 5, 6]]
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    step = [
        SequenceSlice(0, [30], [3], 3, logits_at=[0]),
        SequenceSlice(1, [40, 41, 42], [5, 6, 6], 5, tree_mask=tree, logits_at=[0, 1, 2]),
        SequenceSlice(2, [50], [2], 2, logits_at=[0]),
        SequenceSlice(3, [60], [4], 4, logits_at=[0]),
    ]
    outs = {}
    for call_cost in (0, 10**9):  # every length apart, then everything in one call
        monkeypatch.setattr(forward_batch, "CALL_COST", call_cost)
        model, cache = _ours(tiny_model)
        _step(model, cache, [SequenceSlice(slot, ids, list(range(len(ids))), 0) for slot, ids in enumerate(prefixes)])
        outs[len(attention_groups(step))] = _step(model, cache, step)
    assert sorted(outs) == [1, 3]  # slots 0 and 2..3 of length 1 with a gap, the tree alone
    torch.testing.assert_close(outs[3], outs[1], atol=1e-5, rtol=1e-5)


def test_kv_keep_makes_an_accepted_branch_contiguous(tiny_model):
    """After keeping branch b's entries, decoding continues exactly as if only b was fed."""
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    model, cache = _ours(tiny_model)
    prefix = [5, 17, 42, 9]
    _step(model, cache, [SequenceSlice(0, prefix, list(range(4)), 0)])
    tree = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 1]], dtype=torch.bool)
    _step(model, cache, [SequenceSlice(0, [100, 200, 201], [4, 4, 5], 4, tree_mask=tree)])
    cache.keep(0, src_positions=[5, 6], dst_start=4)  # keep b0 b1 (cache positions 5, 6)
    out = _step(model, cache, [SequenceSlice(0, [77], [6], 6, logits_at=[0])])
    with torch.inference_mode():
        ref = hf(torch.tensor([prefix + [200, 201, 77]])).logits[0, -1]
    torch.testing.assert_close(out[0], ref, atol=1e-4, rtol=1e-4)


def test_unsupported_architecture_is_named(tmp_path):
    path = build_tiny_model(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        _ours(path)


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_files_are_named(tmp_path, missing):
    path = build_tiny_model(tmp_path)
    (path / missing).unlink()
    with pytest.raises(ValueError, match=missing.split(".")[0]):
        _ours(ModelFiles.check(path).path)  # as the engine loads its target (drafts need no tokenizer)


def test_a_missing_part_of_a_fused_weight_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = build_tiny_model(tmp_path)
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.qkv_proj\.k_proj\.weight"):
        _ours(path)


def test_tensor_parallel_size_must_divide_heads(tmp_path):
    from specserve.distributed.parallel_state import TensorParallelGroup

    path = build_tiny_model(tmp_path, num_attention_heads=4, num_key_value_heads=1)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        load_model(path, TensorParallelGroup(rank=0, size=2), torch.float32, torch.device("cpu"), None)


def test_a_draft_directory_needs_no_tokenizer(tmp_path):
    path = build_tiny_model(tmp_path)
    (path / "tokenizer.json").unlink()
    assert ModelFiles.check(path, tokenizer=False).path == path
    _ours(path)


def test_a_model_built_on_another_device_keeps_every_tensor_there(tiny_model):
    """What load_model does on a GPU (build under ``torch.device``), on the meta device here:
    a CPU-only tensor mixed into construction fails as it would on CUDA."""
    from transformers import AutoConfig

    from specserve.models.architecture import ModelArchitecture
    from specserve.models.llama import LlamaForCausalLM

    arch = ModelArchitecture.from_hf_config(AutoConfig.from_pretrained(tiny_model))
    with torch.device("meta"):
        model = LlamaForCausalLM(arch, SINGLE_PROCESS, 64)
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and all(t.device.type == "meta" for t in tensors)
