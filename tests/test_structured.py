"""Structured output on tiny random models: outputs match their constraint, speculation under a
constraint equals plain decoding under it, and bad constraints are clear errors."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
import torch

from specserve.engine.async_engine import AsyncLLMEngine
from specserve.engine.request import FinishReason
from specserve.engine.sampling_params import SamplingParams, StructuredOutput
from specserve.spec.tree import TokenTree, TreeBudget
from specserve.spec.verifier import verify
from test_engine import assert_all_slots_free, run
from test_speculative import spec_engine
from tiny_models import PROMPTS

GREEDY_SHORT = SamplingParams(max_tokens=8, temperature=0.0)
SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["color", "n"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},  # a random model would otherwise pad forever
}
CONSTRAINTS = {
    "regex": (StructuredOutput(regex=r"[a-z ]{4,12}\."), lambda text: re.fullmatch(r"[a-z ]{4,12}\.", text)),
    "choice": (StructuredOutput(choice=["quick fox", "lazy dog", "hello"]),
               lambda text: text in ("quick fox", "lazy dog", "hello")),
    "json_schema": (StructuredOutput(json_schema=SCHEMA),
                    lambda text: json.loads(text)["color"] in ("red", "green", "blue")),
}


@pytest.mark.parametrize("name", sorted(CONSTRAINTS))
def test_outputs_match_their_constraint_and_speculation_under_it_is_exact(tiny_model, tiny_engine, name):
    """Greedy and sampled: the plain engine's outputs match the constraint and end when it is
    complete; an engine that speculates (the target drafting for itself, so its drafts often
    break the constraint, beside unconstrained requests) gives the same tokens."""
    constraint, matches = CONSTRAINTS[name]
    params = [SamplingParams(max_tokens=40, temperature=t, seed=i, structured=constraint, ignore_eos=True)
              for i, t in enumerate([0.0, 0.0, 1.0, 1.0, 0.8])]
    params[1] = params[1].model_copy(update={"structured": None})  # an unconstrained neighbour
    plain = run(tiny_engine, PROMPTS, params)
    for p, out in zip(params, plain):
        if p.structured is not None:
            assert out.output.finish_reason is FinishReason.STOP and matches(out.output.text), out.output.text
    engine = spec_engine(tiny_model, tiny_model, budget=TreeBudget(depth=3, width=2))
    speculated = run(engine, PROMPTS, params)
    assert [o.output.token_ids for o in speculated] == [o.output.token_ids for o in plain]
    assert engine.spec_stats.accepted > 0
    assert_all_slots_free(engine)


def test_drafted_nodes_the_constraint_refuses_are_never_verified(tiny_model, tiny_engine, monkeypatch):
    """The target drafting for itself breaks the pattern on many paths; what the controller gets
    to verify holds only the paths the constraint allows, and the output stays exact."""
    params = SamplingParams(max_tokens=40, temperature=0.0, structured=CONSTRAINTS["regex"][0], ignore_eos=True)
    engine = spec_engine(tiny_model, tiny_model, budget=TreeBudget(depth=3, width=2))
    select, verdicts = engine.controller.select, []

    def checked_select(step, trees):
        for view, tree in zip(step.requests, trees):
            verdicts.extend(engine.requests[view.request_id].constraint.accepts(tree.token_paths()))
        return select(step, trees)

    monkeypatch.setattr(engine.controller, "select", checked_select)
    speculated = run(engine, PROMPTS, params)
    assert verdicts and all(verdicts)
    assert engine.spec_stats.drafted > engine.spec_stats.verified
    assert [o.output.token_ids for o in speculated] == [o.output.token_ids for o in run(tiny_engine, PROMPTS, params)]


def test_a_tree_keeps_the_nodes_it_is_told_to_and_counts_what_was_drafted():
    tree = TokenTree()
    for token, parent in [(5, -1), (6, -1), (7, 0), (8, 1), (9, 2)]:
        tree.add(token, parent, 0.5)
    kept = tree.keep([True, False, True, False, True])
    assert (kept.tokens, kept.parents, kept.depths) == ([5, 7, 9], [-1, 0, 1], [1, 2, 3])
    assert kept.num_drafted == 5 and tree.keep([True] * 5) is tree


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_tokens_the_constraint_forces_are_drafted_and_always_accepted(tiny_engine, temperature):
    """Without a drafter, the keys and punctuation a JSON schema forces are drafted from the
    constraint and verified: every one is accepted, in fewer steps, and the output is the one
    of a request that refuses speculation (depth 0)."""
    def params(**extra):
        return SamplingParams(max_tokens=60, temperature=temperature, seed=3, structured=CONSTRAINTS["json_schema"][0],
                              **extra)

    before = tiny_engine.spec_stats.to_dict()
    jumped = run(tiny_engine, PROMPTS[:3], params())
    after = tiny_engine.spec_stats.to_dict()
    plain = run(tiny_engine, PROMPTS[:3], params(speculation=TreeBudget(depth=0)))
    assert [o.output.token_ids for o in jumped] == [o.output.token_ids for o in plain]
    assert all(o.spec_stats is None for o in plain)
    for out in jumped:
        stats = out.spec_stats
        assert stats.accepted == stats.verified > 0
    assert after["accepted"] - before["accepted"] == sum(o.spec_stats.accepted for o in jumped)


def test_a_forced_run_longer_than_a_tree_is_drafted_in_pieces(tiny_engine):
    """A choice of one long string forces every token: the engine drafts at most the deepest
    tree a step (a longer one failed the whole step) and the request still gets its string."""
    text = "the quick brown fox jumps over the lazy dog " * 4
    assert len(tiny_engine.tokenizer.encode(text)) > 40
    params = SamplingParams(max_tokens=200, temperature=0, structured=StructuredOutput(choice=[text]))
    out = run(tiny_engine, ["Hi", "Hello"], [params, GREEDY_SHORT])[0]
    assert out.output.text == text and out.output.finish_reason is FinishReason.STOP
    assert out.spec_stats.steps >= 2


def test_the_tokens_allowed_after_each_path_are_those_allowed_after_emitting_it(tiny_engine):
    """``allowed`` for every prefix of a valid output equals the mask of a constraint that
    emitted the prefix, and leaves the constraint's own state as it was."""
    spec = StructuredOutput(json_schema=SCHEMA)
    tokens = tiny_engine.tokenizer.encode('{"color":"green","n":7}')
    vocab = tiny_engine.vocab_size
    constraint = tiny_engine.grammars.constraint(spec)
    at_once = constraint.allowed([tokens[:i] for i in range(len(tokens) + 1)], vocab)
    assert constraint.allowed([[]], vocab).equal(at_once[:1])
    emitted = tiny_engine.grammars.constraint(spec)
    for i, token in enumerate(tokens):
        assert emitted.allowed([[]], vocab)[0].equal(at_once[i])
        assert at_once[i, token]
        emitted.accept(token)
    assert emitted.complete and not constraint.complete
    assert constraint.allowed([[tokens[0], tokens[0]]], vocab).all()  # a refused path allows anything


def test_verification_masks_each_node_with_the_state_after_its_path(tiny_engine):
    """A drafted chain that spells a choice, under logits whose favourite token the choice
    refuses everywhere: greedy verification accepts the whole chain only if every row is
    masked after its own path, then ends with the only token left, EOS."""
    tokenizer = tiny_engine.tokenizer
    path = tokenizer.encode("lazy dog")
    junk = tokenizer.encode("Q")[0]
    logits = torch.zeros(len(path) + 1, tiny_engine.vocab_size)
    logits[:, junk] = 10.0
    for row, token in enumerate(path):
        logits[row, token] = 5.0
    tree = TokenTree(tokens=path, parents=list(range(-1, len(path) - 1)), probs=[1.0] * len(path),
                     path_probs=[1.0] * len(path), depths=list(range(1, len(path) + 1)))
    params = SamplingParams(temperature=0.0, structured=StructuredOutput(choice=["quick fox", "lazy dog"]))
    constraint = tiny_engine.grammars.constraint(params.structured)
    verdict = verify(tree, logits, params, None, constraint=constraint)
    assert verdict.tokens == path + [tokenizer.eos_token_id]
    assert verify(tree, logits, params.model_copy(update={"structured": None}), None).tokens == [junk]


@pytest.mark.parametrize("constraint, message", [
    ({"regex": "(unclosed"}, "unclosed group"),
    ({"json_schema": {"type": "nonsense"}}, "nonsense"),
    ({"grammar": "start: undefined_rule"}, "undefined_rule"),
])
def test_an_invalid_constraint_is_a_clear_value_error(tiny_engine, constraint, message):
    with pytest.raises(ValueError, match=f"(?s)structured output: .*{message}"):
        tiny_engine.make_request("bad", "hi", SamplingParams(structured=StructuredOutput(**constraint)))


@pytest.mark.parametrize("fields", [{}, {"regex": "a", "choice": ["b"]}, {"choice": []}])
def test_a_constraint_names_exactly_one_kind(fields):
    with pytest.raises(ValueError):
        StructuredOutput(**fields)


def test_a_grammar_compiles_off_the_event_loop(tiny_engine, monkeypatch):
    """A slow grammar (here 0.5 s) must not stall the other streams on the server's loop."""
    compile_constraint = tiny_engine.grammars.constraint

    def slow(spec):
        time.sleep(0.5)
        return compile_constraint(spec)

    monkeypatch.setattr(tiny_engine.grammars, "constraint", slow)
    engine = AsyncLLMEngine(engine=tiny_engine)

    async def main() -> tuple[int, str]:
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        params = SamplingParams(max_tokens=8, temperature=0, structured=StructuredOutput(choice=["hello"]))
        async for output in engine.generate("Hi", params):
            pass
        ticker.cancel()
        return ticks, output.output.text

    try:
        ticks, text = asyncio.run(main())
    finally:
        engine.stop()
    assert text == "hello" and ticks >= 10
