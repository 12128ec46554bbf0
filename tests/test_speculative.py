"""Speculative decoding on tiny random models: lossless greedy and sampling, KV rollback."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM

from specserve.config import DTYPES, ControlConfig, EngineConfig, SpeculativeConfig
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.sampling_params import SamplingParams, StructuredOutput
from specserve.models.linear_kernel import KernelPlan, WeightLayout, int8_available
from specserve.spec.draft_model import VOCAB_FILE
from specserve.spec.stats import SpecStats
from specserve.spec.tree import TreeBudget
from test_engine import GREEDY, assert_all_slots_free, run
from tiny_models import PROMPTS, build_tiny_eagle, build_tiny_model

RAGGED_PROMPTS = PROMPTS + ["The quick brown fox jumps over the lazy dog. The quick brown fox"]


@pytest.fixture(scope="module")
def tiny_draft(tmp_path_factory):
    """A different (1-layer, re-seeded) model sharing the tiny target's tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-draft"), num_hidden_layers=1, seed=1)


@pytest.fixture(scope="module")
def reduced_vocab_draft(tmp_path_factory, tiny_model):
    """The target itself, cut down to its first 300 token ids plus an unknown row."""
    path = tmp_path_factory.mktemp("reduced-draft")
    build_tiny_model(path)
    weights = load_file(tiny_model / "model.safetensors")
    embed = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = torch.cat([embed[:300], embed[300:].mean(0, keepdim=True)])
    weights.pop("lm_head.weight", None)
    save_file(weights, path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "vocab_size": 301}))
    (path / VOCAB_FILE).write_text(json.dumps({"target_ids": list(range(300))}))
    return path


@pytest.fixture(scope="module")
def tiny_eagle(tmp_path_factory, tiny_model):
    """A random EAGLE head over the tiny target's features (300-token vocabulary)."""
    return build_tiny_eagle(tmp_path_factory.mktemp("tiny-eagle"), tiny_model)


@pytest.fixture(scope="module")
def plain_outputs(tiny_engine):
    return [o.output.token_ids for o in run(tiny_engine, RAGGED_PROMPTS, GREEDY)]


def spec_engine(
    tiny_model, draft=None, method="draft", budget=TreeBudget(), policy="fixed", max_num_seqs=8, **kwargs
) -> LLMEngine:
    """An engine that speculates on the tiny model; ``fixed`` drafts and verifies every budget.
    The draft runs in the target's dtype (``draft_dtype`` 'auto' would pick int8 on a CPU), so a
    self-draft agrees with the target on any machine."""
    base = dict(model=str(tiny_model), max_num_seqs=max_num_seqs, max_model_len=256,
                control=ControlConfig(policy=policy), **kwargs)
    target_dtype = EngineConfig(**base).torch_dtype()
    spec = SpeculativeConfig(
        method=method, draft_model=None if draft is None else str(draft), budget=budget,
        draft_dtype=next(name for name, dtype in DTYPES.items() if dtype == target_dtype),
    )
    return LLMEngine(EngineConfig(**base, speculative=spec))


BUDGETS = [
    TreeBudget(depth=1, width=1),
    TreeBudget(depth=5, width=1),
    TreeBudget(depth=3, width=3),
    TreeBudget(depth=4, width=4, max_nodes=6),
]


@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: f"d{b.depth}w{b.width}n{b.node_limit}")
@pytest.mark.parametrize("drafter", ["draft", "target", "reduced", "eagle", "ngram", "hybrid"])
def test_greedy_speculation_equals_plain_greedy(
    tiny_model, tiny_draft, reduced_vocab_draft, tiny_eagle, plain_outputs, drafter, budget
):
    drafts = {"draft": tiny_draft, "target": tiny_model, "reduced": reduced_vocab_draft, "eagle": tiny_eagle,
              "hybrid": tiny_draft}
    method = drafter if drafter in ("ngram", "hybrid") else "draft"
    engine = spec_engine(tiny_model, drafts.get(drafter), method, budget)
    outputs = run(engine, RAGGED_PROMPTS, GREEDY, stagger=2)
    assert [o.output.token_ids for o in outputs] == plain_outputs
    assert engine.spec_stats.steps > 0
    assert_all_slots_free(engine)
    if drafter == "hybrid":
        assert not engine.drafter._accuracy and not engine.drafter._pending
    model_drafter = engine.drafter.model if drafter == "hybrid" else engine.drafter
    assert not model_drafter._cached if drafter != "ngram" else True


def test_requests_aborted_while_speculating_leave_nothing_behind(tiny_model, tiny_draft, plain_outputs):
    """Requests aborted mid-speculation (as a client that disconnects) free their slots and
    every drafter and controller state; the requests that reuse those slots stay lossless."""
    engine = spec_engine(tiny_model, tiny_draft, "hybrid", TreeBudget(depth=3, width=2), max_num_seqs=2)
    doomed = [engine.make_request(f"doomed{i}", prompt, GREEDY) for i, prompt in enumerate(RAGGED_PROMPTS[:2])]
    for request in doomed:
        engine.add_request(request)
    for _ in range(4):
        engine.step()
    assert engine.spec_stats.verify_steps > 0
    for request in doomed:
        assert engine.abort_request(request.request_id).finished
    assert_all_slots_free(engine)
    assert not engine.drafter._accuracy and not engine.drafter._pending and not engine.drafter.model._cached
    assert not engine.controller.predictor._request_rate
    outputs = run(engine, RAGGED_PROMPTS, GREEDY)
    assert [o.output.token_ids for o in outputs] == plain_outputs


def test_logit_bias_steers_plain_and_speculative_decoding_alike(tiny_model, tiny_draft, tiny_engine):
    """The bias is added wherever a token is chosen, so verification stays lossless under it."""
    plain = [o.output.token_ids for o in run(tiny_engine, PROMPTS, GREEDY)]
    forced = GREEDY.model_copy(update={"logit_bias": {42: 100.0}})
    banned = GREEDY.model_copy(update={"logit_bias": {plain[0][0]: -100.0}})
    nudged = GREEDY.model_copy(update={"logit_bias": {t: 2.0 for t in range(10, 200, 7)}})
    assert all(o.output.token_ids == [42] * 24 for o in run(tiny_engine, PROMPTS, forced))
    assert run(tiny_engine, PROMPTS[:1], banned)[0].output.token_ids[0] != plain[0][0]
    engine = spec_engine(tiny_model, tiny_draft, budget=TreeBudget(depth=3, width=2))
    for params in (forced, banned, nudged):
        expected = [o.output.token_ids for o in run(tiny_engine, PROMPTS, params)]
        assert [o.output.token_ids for o in run(engine, PROMPTS, params)] == expected
    assert engine.spec_stats.accepted > 0
    with pytest.raises(ValueError, match="logit_bias token ids"):
        tiny_engine.make_request("bad", "hi", GREEDY.model_copy(update={"logit_bias": {10**6: 1.0}}))


def test_penalties_count_the_history_and_each_tree_path_alike(tiny_model, tiny_draft, tiny_engine):
    """A verified node's penalties count the nodes above it, as plain decoding would have
    generated them, so greedy speculation with penalties equals plain decoding with them."""
    plain = [o.output.token_ids for o in run(tiny_engine, PROMPTS, GREEDY)]
    repetitive = max(plain, key=lambda tokens: len(tokens) - len(set(tokens)))
    assert len(repetitive) > len(set(repetitive))  # the tiny model repeats itself
    penalties = [
        GREEDY.model_copy(update={"frequency_penalty": 2.0}),
        GREEDY.model_copy(update={"presence_penalty": 1.5, "frequency_penalty": 0.5, "logit_bias": {42: 3.0}}),
        GREEDY.model_copy(update={"presence_penalty": -2.0}),
        GREEDY.model_copy(update={"repetition_penalty": 1.5}),
        GREEDY.model_copy(update={"repetition_penalty": 0.7, "frequency_penalty": 0.5}),
    ]
    # The target drafting for itself proposes its unpenalized, repetitive continuations: paths
    # whose later nodes are only right if the penalties count the earlier ones.
    engines = [spec_engine(tiny_model, tiny_model, budget=TreeBudget(depth=6, width=2)),
               spec_engine(tiny_model, tiny_draft, "hybrid", TreeBudget(depth=4, width=2))]
    for params in penalties:
        expected = [o.output.token_ids for o in run(tiny_engine, PROMPTS, params)]
        for engine in engines:
            assert [o.output.token_ids for o in run(engine, PROMPTS, params)] == expected
    assert all(engine.spec_stats.accepted > 0 for engine in engines)
    discouraged = run(tiny_engine, PROMPTS, penalties[0])
    assert sum(len(o.output.token_ids) - len(set(o.output.token_ids)) for o in discouraged) < sum(
        len(tokens) - len(set(tokens)) for tokens in plain)


def test_a_bfloat16_draft_beside_a_float32_target_stays_lossless(tiny_model, tiny_draft):
    base = dict(model=str(tiny_model), max_num_seqs=8, max_model_len=256, dtype="float32")
    plain = run(LLMEngine(EngineConfig(**base)), RAGGED_PROMPTS, GREEDY)  # float32 on a GPU too
    engine = LLMEngine(EngineConfig(
        **base, control=ControlConfig(policy="fixed"),
        speculative=SpeculativeConfig(draft_model=str(tiny_draft), budget=TreeBudget(depth=3, width=2),
                                      draft_dtype="bfloat16"),
    ))
    assert engine.drafter.runner.dtype == torch.bfloat16 and engine.executor.runner.dtype == torch.float32
    outputs = run(engine, RAGGED_PROMPTS, GREEDY, stagger=2)
    assert [o.output.token_ids for o in outputs] == [o.output.token_ids for o in plain]
    assert engine.spec_stats.accepted > 0
    assert_all_slots_free(engine)


@pytest.mark.skipif(not int8_available("cpu"), reason="this PyTorch build has no fbgemm")
def test_an_int8_draft_stays_lossless_and_keeps_its_cache_in_float32(tiny_model, tiny_draft):
    base = dict(model=str(tiny_model), max_num_seqs=8, max_model_len=256, device="cpu")
    plain = run(LLMEngine(EngineConfig(**base)), RAGGED_PROMPTS, GREEDY)
    engine = LLMEngine(EngineConfig(
        **base, control=ControlConfig(policy="fixed"),
        speculative=SpeculativeConfig(draft_model=str(tiny_draft), budget=TreeBudget(depth=3, width=2),
                                      draft_dtype="int8"),
    ))
    runner = engine.drafter.runner
    assert runner.dtype == torch.float32 and runner.kv_cache.keys[0].dtype == torch.float32
    assert runner.model.lm_head.kernel.plan == KernelPlan.single(WeightLayout.INT8_DYNAMIC)
    outputs = run(engine, RAGGED_PROMPTS, GREEDY, stagger=2)
    assert [o.output.token_ids for o in outputs] == [o.output.token_ids for o in plain]
    assert engine.spec_stats.accepted > 0
    assert_all_slots_free(engine)


@pytest.mark.parametrize("int8", [True, False])
def test_the_default_draft_dtype_is_int8_on_a_cpu_with_fbgemm_else_the_engines(monkeypatch, int8):
    monkeypatch.setattr("specserve.config.int8_available", lambda device: int8 and device == "cpu")
    cpu = EngineConfig(device="cpu", speculative=SpeculativeConfig())
    assert cpu.draft_dtype() == ("int8" if int8 else cpu.dtype)
    chosen = EngineConfig(device="cpu", speculative=SpeculativeConfig(draft_dtype="float32"))
    assert chosen.draft_dtype() == "float32"
    gpu = EngineConfig(device="cuda", speculative=SpeculativeConfig())
    assert gpu.draft_dtype() == gpu.dtype
    with pytest.raises(ValueError, match="int8"):
        EngineConfig(device="cuda", speculative=SpeculativeConfig(draft_dtype="int8")).draft_dtype()


def test_target_as_its_own_draft_accepts_every_chain_token(tiny_model):
    engine = spec_engine(tiny_model, tiny_model, budget=TreeBudget(depth=4))
    outputs = run(engine, PROMPTS, GREEDY)
    stats = engine.spec_stats
    assert stats.accepted == stats.verified  # identical greedy proposals: nothing is rejected
    assert stats.mean_accepted_tokens > 3.5
    assert all(o.spec_stats.accepted > 0 for o in outputs)


def test_requests_with_different_trees_and_without_speculation_share_a_batch(
    tiny_model, tiny_draft, plain_outputs
):
    engine = spec_engine(tiny_model, tiny_draft)
    budgets = [None, TreeBudget(depth=0), TreeBudget(depth=2, width=4), TreeBudget(depth=6),
               TreeBudget(depth=3, width=2, max_nodes=3), TreeBudget(depth=1, width=8)]
    params = [GREEDY.model_copy(update={"speculation": b}) for b in budgets]
    outputs = run(engine, RAGGED_PROMPTS, params)
    assert [o.output.token_ids for o in outputs] == plain_outputs
    assert outputs[1].spec_stats is None
    assert all(o.spec_stats is not None for i, o in enumerate(outputs) if i != 1)


def test_speculation_respects_max_tokens_and_stop_strings(tiny_model, tiny_engine):
    params = SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True, stop=["fox"])
    plain = run(tiny_engine, PROMPTS, params)
    spec = run(spec_engine(tiny_model, tiny_model, budget=TreeBudget(depth=6)), PROMPTS, params)
    assert [(o.output.token_ids, o.output.text, o.output.finish_reason) for o in spec] == [
        (o.output.token_ids, o.output.text, o.output.finish_reason) for o in plain
    ]


def _slot_kv(cache, slot: int, length: int) -> list[torch.Tensor]:
    return [t[slot, :, :length].clone() for t in cache.keys + cache.values]


def test_kv_rollback_leaves_caches_as_if_only_accepted_tokens_were_fed(tiny_model, reduced_vocab_draft):
    engine = spec_engine(tiny_model, reduced_vocab_draft, budget=TreeBudget(depth=4, width=3))
    engine.add_request(engine.make_request("r", PROMPTS[3], GREEDY.model_copy(update={"max_tokens": 60})))
    while engine.spec_stats.steps < 8:
        engine.step()
    stats = engine.spec_stats
    assert 0 < stats.accepted < stats.verified  # paths were kept (and compacted), others dropped
    request, drafter = engine.requests["r"], engine.drafter
    target_tokens = request.all_token_ids[: request.num_computed_tokens]
    draft_tokens = drafter.vocab.to_draft[request.all_token_ids[: drafter._cached["r"]]].tolist()
    for model, tokens, cache in (
        (tiny_model, target_tokens, engine.executor.runner.kv_cache),
        (reduced_vocab_draft, draft_tokens, drafter.runner.kv_cache),
    ):
        fresh = LLMEngine(EngineConfig(model=str(model), max_num_seqs=1, max_model_len=256))
        fresh.add_request(fresh.make_request("r", tokens, SamplingParams(max_tokens=1)))
        fresh.step()
        n = len(tokens)
        for ours, reference in zip(_slot_kv(cache, request.slot, n), _slot_kv(fresh.executor.runner.kv_cache, 0, n)):
            torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_a_draft_model_drafts_below_the_prompt_in_its_prefill_step_and_reports_each_forward(tiny_model):
    """What drafting really fed, so the controller can price it. The step that prefills a prompt
    while nothing else decodes (under a policy that speculates) drafts below its last token: the
    first draft forward feeds the whole prompt, then per level the frontier, and the prefill
    forward verifies the chain (a self-draft's is accepted whole: four tokens at once); next step
    the draft feeds what it did not feed itself: the deepest accepted node and the bonus token.
    A prompt the step leaves no room to draft below is read instead, so that its first tree feeds
    only its root. Under ``none`` the draft reads nothing."""
    engine = spec_engine(tiny_model, tiny_model, budget=TreeBudget(depth=3))
    prompt = (engine.tokenizer.encode(PROMPTS[3]) * 4)[:16]
    params = GREEDY.model_copy(update={"max_tokens": 40})
    engine.add_request(engine.make_request("r", prompt, params))
    engine.step()
    assert engine.drafter.forwards == [16, 1, 1]
    assert engine.spec_stats.accepted == 3 and len(engine.requests["r"].output_token_ids) == 4
    assert engine.drafter.pending("r", len(engine.requests["r"].all_token_ids)) == 2
    engine.step()
    assert engine.drafter.forwards[0] == 2

    full = spec_engine(tiny_model, tiny_model, budget=TreeBudget(depth=3), max_num_batched_tokens=16)
    full.add_request(full.make_request("r", prompt, params))
    full.step()  # the prompt fills the step: no tree, but the draft reads it
    assert full.spec_stats.steps == 0 and len(full.requests["r"].output_token_ids) == 1
    assert full.drafter.pending("r", 17) == 1  # what the controller prices beforehand: the root
    full.step()
    assert full.drafter.forwards == [1, 1, 1]  # the first token, then a chain of 3

    plain = spec_engine(tiny_model, tiny_model, budget=TreeBudget(depth=3), policy="none")
    plain.add_request(plain.make_request("r", prompt, params))
    plain.step()
    assert plain.drafter.pending("r", 17) == 17


def test_the_last_chunk_of_a_prompt_verifies_a_tree_beside_its_scored_prompt_tokens(tiny_model, tiny_engine):
    """A prompt chunked across steps drafts below its last token in the step of its last chunk:
    that forward scores the chunk's prompt tokens, picks the first token and verifies the tree
    (a self-draft's chain: four tokens at once), all as plain decoding would have them."""
    engine = spec_engine(tiny_model, tiny_model, budget=TreeBudget(depth=3), max_num_batched_tokens=16)
    prompt = (engine.tokenizer.encode(PROMPTS[3]) * 4)[:24]
    params = GREEDY.model_copy(update={"max_tokens": 8, "logprobs": 2, "prompt_logprobs": 2})
    engine.add_request(engine.make_request("r", prompt, params))
    engine.step()  # the first 16 prompt tokens
    assert engine.requests["r"].output_token_ids == []
    engine.step()  # the last 8, and the tree below them
    assert len(engine.requests["r"].output_token_ids) == 4 and engine.spec_stats.accepted == 3
    while engine.has_unfinished_requests():
        outputs = engine.step()
    [spec], [plain] = outputs, run(tiny_engine, [prompt], params)
    assert spec.output.token_ids == plain.output.token_ids
    rows = zip(spec.output.logprobs + spec.prompt_logprobs[1:], plain.output.logprobs + plain.prompt_logprobs[1:])
    for got, want in rows:
        assert list(got) == list(want) and list(got.values()) == pytest.approx(list(want.values()), abs=1e-4)


def test_target_features_are_kept_as_copies_and_only_for_requests_that_may_draft(tiny_model, tiny_eagle):
    """A request that refuses speculation never drafts, so the engine keeps none of its target
    features; a request that drafts keeps copies, not views that would hold every step's whole
    hidden states alive."""
    engine = spec_engine(tiny_model, tiny_eagle, budget=TreeBudget(depth=2, width=2))
    plain = GREEDY.model_copy(update={"max_tokens": 30, "speculation": TreeBudget(depth=0)})
    engine.add_request(engine.make_request("plain", PROMPTS[0], plain))
    engine.add_request(engine.make_request("spec", PROMPTS[1], GREEDY.model_copy(update={"max_tokens": 30})))
    for _ in range(4):
        engine.step()
        assert "plain" not in engine._target_features
        for part in engine._target_features.get("spec", []):
            assert part.untyped_storage().nbytes() == part.numel() * part.element_size()
    assert engine.requests["plain"].spec_stats.steps == 0 and engine.spec_stats.steps > 0


def test_eagle_cache_holds_the_sequence_fed_with_the_target_features(tmp_path):
    """After speculative steps (trees dropped, accepted tokens fed again), the EAGLE draft's K/V
    equal one fresh feed of the sequence with the target's own features of each previous
    position: the engine handed over exactly the right features, in order. The head repeats the
    target's last choice, which this target accepts now and then."""
    from specserve.distributed.parallel_state import SINGLE_PROCESS
    from specserve.engine.model_runner import ModelRunner
    from specserve.models.forward_batch import SequenceSlice

    target = build_tiny_model(tmp_path / "target", vocab_size=12, seed=3)
    eagle = build_tiny_eagle(tmp_path / "eagle", target, known_tokens=10, repeat=True)
    # float32 everywhere: the reference features come from HF in float32 (bf16 on a GPU would not match)
    engine = spec_engine(target, eagle, budget=TreeBudget(depth=3, width=2), dtype="float32")
    engine.add_request(engine.make_request("r", [5, 7, 3, 9, 2], GREEDY.model_copy(update={"max_tokens": 40})))
    while engine.spec_stats.steps < 10:
        engine.step()
    assert engine.spec_stats.accepted > 0
    request, drafter = engine.requests["r"], engine.drafter
    cached = drafter._cached["r"]
    tokens = request.all_token_ids[:cached]
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    with torch.no_grad():
        features = model.model(input_ids=torch.tensor([tokens])).last_hidden_state[0]
    fresh = ModelRunner(EngineConfig(model=str(eagle), max_num_seqs=1, max_model_len=256, dtype="float32"), eagle, SINGLE_PROCESS)
    fresh.forward(
        [SequenceSlice(0, drafter.vocab.to_draft[tokens].tolist(), list(range(cached)), 0, logits_at=[cached - 1])],
        torch.cat([torch.zeros(1, features.shape[1]), features[:-1]]),
    )
    for ours, reference in zip(_slot_kv(drafter.runner.kv_cache, request.slot, cached), _slot_kv(fresh.kv_cache, 0, cached)):
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_ngram_drafter_finds_the_continuation_of_the_longest_match():
    from specserve.spec.drafter import DraftRequest
    from specserve.spec.ngram import NgramDrafter

    drafter = NgramDrafter(min_n=1, max_n=3)
    context = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 0, 2, 3, 6, 1, 2, 3]
    assert drafter.continuations(context, 3) == [[7, 8, 0], [4, 5, 9]]  # most recent first
    tree = drafter.propose([DraftRequest("r", 0, context, TreeBudget(depth=3, width=2))])[0]
    assert tree.tokens[:2] == [7, 4] and tree.probs[:2] == [0.5, 0.5]
    assert [tree.tokens[i] for i in tree.path(len(tree) - 1)] in ([7, 8, 0], [4, 5, 9])
    assert drafter.continuations([5, 6, 7], 2) == []


def test_ngram_lookups_of_a_growing_sequence_equal_a_scan_of_it():
    """A request's n-gram index, extended as its sequence grows (and rebuilt when the sequence
    is not a continuation of what it indexed), finds what scanning the whole sequence finds."""
    from specserve.spec.ngram import MAX_MATCHES, NgramDrafter

    def scan(token_ids, length, min_n, max_n):
        for n in range(min(max_n, len(token_ids) - 1), min_n - 1, -1):
            starts = [s for s in range(len(token_ids) - n) if token_ids[s : s + n] == token_ids[-n:]]
            if starts:
                return [token_ids[s + n : s + n + length] for s in starts[::-1][:MAX_MATCHES]]
        return []

    rng = random.Random(0)
    for _ in range(50):
        min_n, max_n = rng.randint(1, 2), rng.randint(2, 4)
        drafter = NgramDrafter(min_n, max_n)
        sequence = [rng.randrange(5) for _ in range(rng.randint(1, 5))]
        for _ in range(40):
            assert drafter.continuations(sequence, 3, "r") == scan(sequence, 3, min_n, max_n)
            sequence = sequence + [rng.randrange(5) for _ in range(rng.randint(1, 3))]
            if rng.random() < 0.1:
                sequence = sequence[: rng.randint(1, len(sequence))]
        drafter.release("r")
        assert drafter._indexes == {}


def test_hybrid_speculation_on_repetitive_text_uses_lookups_and_stays_lossless(tiny_model, tiny_draft, tiny_engine):
    prompts = [list(range(3, 11)) * 4, [7, 8, 9] * 8 + [4]]
    plain = [o.output.token_ids for o in run(tiny_engine, prompts, GREEDY)]
    engine = spec_engine(tiny_model, tiny_draft, "hybrid", TreeBudget(depth=4, width=2, max_nodes=6))
    lookups = []
    propose = engine.drafter.lookup.propose
    engine.drafter.lookup.propose = lambda requests: lookups.extend(t for t in propose(requests) if len(t)) or propose(requests)
    assert [o.output.token_ids for o in run(engine, prompts, GREEDY)] == plain
    assert len(lookups) >= len(prompts)  # each prompt's first step at least: its tail repeats
    assert_all_slots_free(engine)


def test_merged_trees_hold_both_trees_paths_once():
    from specserve.spec.tree import TokenTree

    a, b = TokenTree(), TokenTree()
    a_first = a.add(5, -1, 0.6)
    a.add(6, a_first, 0.5)
    a.add(9, -1, 0.3)
    b_first = b.add(5, -1, 0.8)  # the same first token, more likely
    b.add(7, b_first, 1.0)
    merged = a.merge(b)
    paths = {tuple(merged.tokens[n] for n in merged.path(i)): merged.path_probs[i] for i in range(len(merged))}
    assert paths == pytest.approx({(5,): 0.8, (5, 6): 0.4, (9,): 0.3, (5, 7): 0.8})
    assert all(p < i for i, p in enumerate(merged.parents))  # parents first
    assert merged.num_drafted == 4


@pytest.mark.parametrize("seed", range(30))
def test_a_tree_keeps_its_most_valuable_nodes_with_their_ancestors(seed):
    import random

    from specserve.spec.tree import TokenTree

    rng = random.Random(seed)

    def random_tree() -> TokenTree:
        tree = TokenTree()
        for _ in range(rng.randint(1, 12)):  # coarse probabilities, so that values tie often
            tree.add(rng.randrange(50), rng.randrange(-1, len(tree)), rng.choice([0.25, 0.5, 1.0]))
        return tree

    def wanted(tree: TokenTree, n: int) -> list[int]:  # the definition: best values, shallow first on ties
        order = sorted(range(len(tree)), key=lambda i: (-tree.path_probs[i], tree.depths[i], i))
        return [tree.tokens[i] for i in sorted(order[:n], key=lambda i: (tree.depths[i], i))]

    merged = random_tree().merge(random_tree())  # merging breaks the depth order of the nodes
    for tree in (merged, merged.select(len(merged) - 1)):  # a selection is in depth order again
        for n in range(1, len(tree)):
            kept = tree.select(n)
            assert kept.tokens == wanted(tree, n)
            assert all(p < i for i, p in enumerate(kept.parents))
            paths = {tuple(kept.tokens[j] for j in kept.path(i)) for i in range(len(kept))}
            assert all(path[:-1] in paths for path in paths if len(path) > 1)  # ancestors came along


class _FixedDrafter:
    """A stand-in draft model that always proposes one token at a fixed probability."""

    needs_target_features = False
    forwards = ()

    def __init__(self, token: int, prob: float) -> None:
        self.token, self.prob = token, prob

    def propose(self, requests, keep_going=None):
        from specserve.spec.tree import TokenTree

        trees = []
        for _ in requests:
            tree = TokenTree()
            tree.add(self.token, -1, self.prob)
            trees.append(tree)
        return trees

    def accept(self, request_id, tokens):
        pass

    def release(self, request_id):
        pass


def test_hybrid_drafting_gives_the_budget_to_lookups_while_they_are_right():
    from specserve.spec.drafter import DraftRequest
    from specserve.spec.hybrid import PRIOR_ACCURACY, SMOOTHING, HybridDrafter
    from specserve.spec.ngram import NgramDrafter

    drafter = HybridDrafter(_FixedDrafter(token=99, prob=0.4), NgramDrafter(min_n=1, max_n=2))
    one_node = TreeBudget(depth=1, width=1)

    def first(sequence: list[int]) -> list[int]:
        return drafter.propose([DraftRequest("r", 0, sequence, one_node)])[0].tokens

    assert PRIOR_ACCURACY > 0.4
    assert first([1, 2, 3, 1, 2]) == [3]  # "1 2" went on with 3 before: the lookup wins the node
    assert first([1, 2, 3, 1, 2, 4]) == [99]  # nothing to look up after "2 4": the draft's guess
    missed = (1 - SMOOTHING) * PRIOR_ACCURACY  # the target chose 4 where the lookup said 3
    assert drafter._accuracy["r"] == pytest.approx(missed)
    # "1 2" went on with 4 and with 3: the lookup is half sure of 4, scaled by its accuracy: too little
    assert missed * 0.5 < 0.4 and first([1, 2, 3, 1, 2, 4, 1, 2]) == [99]
    first([1, 2, 3, 1, 2, 4, 1, 2, 4])  # ... and the target did choose 4
    assert drafter._accuracy["r"] == pytest.approx((1 - SMOOTHING) * missed + SMOOTHING)
    drafter.release("r")
    assert not drafter._accuracy and not drafter._pending


def test_hybrid_hint_is_a_matching_lookups_share_times_its_accuracy_learned_without_speculating():
    from specserve.spec.hybrid import PRIOR_ACCURACY, SMOOTHING, HybridDrafter
    from specserve.spec.ngram import NgramDrafter

    drafter = HybridDrafter(_FixedDrafter(token=99, prob=0.4), NgramDrafter(min_n=1, max_n=2))
    assert drafter.acceptance_hint("r", [1, 2, 3]) is None  # nothing to look up
    assert drafter.acceptance_hint("r", [1, 2, 3, 1, 2]) == pytest.approx(PRIOR_ACCURACY)  # "1 2" -> 3, once
    drafter.acceptance_hint("r", [1, 2, 3, 1, 2, 3])  # the target did choose 3: no tree was drafted
    assert drafter._accuracy["r"] == pytest.approx((1 - SMOOTHING) * PRIOR_ACCURACY + SMOOTHING)
    drafter.release("r")
    assert not drafter._accuracy and not drafter._pending and not drafter.lookup._indexes


def _exact_joint(
    model, prompt: list[int], first: int, params: SamplingParams, allowed: list[int] | None = None
) -> dict[tuple[int, int], float]:
    """P(t2, t3 | prompt, t1=first) of the target distribution under ``params``: its penalties
    (repetition on prompt and output, then presence and frequency on the output), only the
    ``allowed`` tokens (if given), then top-k."""
    def dist(generated):
        logits = model(torch.tensor([prompt + generated])).logits[0, -1]
        seen = sorted(set(prompt + generated))
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
        for token in set(generated):
            logits[token] -= params.presence_penalty + params.frequency_penalty * generated.count(token)
        if allowed is not None:
            refused = [t for t in range(logits.shape[0]) if t not in allowed]
            logits[refused] = float("-inf")
        kth = logits.topk(params.top_k).values[-1]
        return logits.masked_fill(logits < kth, float("-inf")).softmax(-1)

    joint = {}
    with torch.no_grad():
        p2 = dist([first])
        for t2 in torch.nonzero(p2).flatten().tolist():
            p3 = dist([first, t2])
            for t3 in torch.nonzero(p3).flatten().tolist():
                joint[(t2, t3)] = (p2[t2] * p3[t3]).item()
    return joint


@pytest.mark.parametrize("penalties", [
    {},
    {"repetition_penalty": 1.8, "presence_penalty": 0.5, "frequency_penalty": 0.7},
    {"structured": "3 of the 9 text tokens refused"},
], ids=["plain", "penalized", "constrained"])
def test_speculative_sampling_matches_the_target_distribution(tmp_path, penalties):
    """Chi-square of (t2, t3) samples against the exact target distribution, on a 12-token
    vocabulary; t2 and t3 come from tree verification (t1 from the prefill step). With
    penalties, a node's distribution depends on the nodes above it; with a constraint, only
    the tokens it allows are drawn. The engine runs in float32, as the exact distribution does
    (bfloat16, a GPU's default, rounds the logits away from the exact distribution)."""
    target = build_tiny_model(tmp_path / "target", vocab_size=12, seed=3)
    draft = build_tiny_model(tmp_path / "draft", vocab_size=12, num_hidden_layers=1, seed=4)
    spec = SpeculativeConfig(draft_model=str(draft), budget=TreeBudget(depth=2, width=2))
    engine = LLMEngine(
        EngineConfig(model=str(target), max_num_seqs=16, max_model_len=64, dtype="float32", speculative=spec,
                     control=ControlConfig(policy="fixed"))
    )
    allowed = None
    if "structured" in penalties:  # ids 3-11 are single characters: allow 6 of them, 5 in a row
        allowed = [3, 4, 6, 8, 9, 11]
        chars = "".join(re.escape(engine.tokenizer.decode([t])) for t in allowed)
        penalties = {"structured": StructuredOutput(regex=f"[{chars}]{{5}}")}
    prompt, n = [5, 7, 3], 4000
    params = [SamplingParams(max_tokens=3, temperature=1.0, top_k=4, seed=s, ignore_eos=True, **penalties)
              for s in range(n)]
    outputs = run(engine, [prompt] * n, params)
    firsts = Counter(o.output.token_ids[0] for o in outputs)
    first = firsts.most_common(1)[0][0]
    observed = Counter(tuple(o.output.token_ids[1:]) for o in outputs if o.output.token_ids[0] == first)
    exact = _exact_joint(AutoModelForCausalLM.from_pretrained(target).eval(), prompt, first, params[0], allowed)
    total = sum(observed.values())
    cells = sorted(exact)
    assert set(observed) <= set(cells)
    norm = sum(exact.values())
    stat = chisquare([observed[c] for c in cells], [exact[c] / norm * total for c in cells])
    assert stat.pvalue > 1e-4, (stat, total)
    assert engine.spec_stats.accepted > 0 and engine.spec_stats.verified > engine.spec_stats.accepted


def test_logprobs_of_verified_tokens_equal_plain_decoding(tiny_model, tiny_engine):
    params = GREEDY.model_copy(update={"logprobs": 3, "max_tokens": 12})
    plain = run(tiny_engine, PROMPTS[:3], params)
    spec = run(spec_engine(tiny_model, tiny_model, budget=TreeBudget(depth=3, width=2)), PROMPTS[:3], params)
    for a, b in zip(plain, spec):
        assert len(b.output.logprobs) == len(b.output.token_ids) == 12
        for pa, pb in zip(a.output.logprobs, b.output.logprobs):
            assert list(pa) == list(pb)
            assert list(pa.values()) == pytest.approx(list(pb.values()), abs=1e-4)


def test_mat_counts_only_steps_that_verified_something():
    """A step whose drafts the controller trimmed away emits one plain token: it is no
    verification step and must not pull MAT toward 1."""
    stats = SpecStats()
    stats.record(drafted=4, verified=2, accepted=1)
    stats.record(drafted=3, verified=0, accepted=0)
    assert (stats.steps, stats.verify_steps, stats.drafted) == (2, 1, 7)
    assert stats.mean_accepted_tokens == 2.0
    assert stats.acceptance_by_depth == [1.0]
