"""`specserve distill` end to end on a tiny target: data (resumable), training, a usable draft."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from specserve.cli import main
from specserve.config import ControlConfig, EngineConfig, SpeculativeConfig
from specserve.distill.data import (
    DOCUMENT_TEMPERATURE,
    SAMPLES_FILE,
    DataConfig,
    _request,
    read_samples,
    user_turn_prefix,
)
from specserve.distill.corpus import split_passages
from specserve.distill.eagle import FEATURES_FILE, load_head
from specserve.distill.prompts import (
    CORPUS_TASKS,
    SELF_PROMPT,
    Prompt,
    chat_prompts,
    corpus_prompts,
    self_written_prompts,
)
from specserve.distill.train import load_draft, optimize, with_distributions
from specserve.engine.llm_engine import LLMEngine
from specserve.spec.tree import TreeBudget
from test_engine import GREEDY, run
from tiny_models import PROMPTS


@pytest.mark.parametrize("method", ["eagle", "model"])
def test_distill_writes_a_draft_the_engine_can_speculate_with(tiny_model, tmp_path, capsys, method):
    work, out = tmp_path / "work", tmp_path / "draft"
    args = ["distill", "--method", method, "--model", str(tiny_model), "--work", str(work), "--out", str(out),
            "--num-prompts", "12", "--num-documents", "2", "--max-new-tokens", "12", "--document-tokens", "24",
            "--batch-size", "8", "--layers", "0", "--draft-vocab", "200", "--epochs", "2", "--num-self-prompts", "6"]
    assert main(args) == 0
    samples = [json.loads(line) for line in (work / SAMPLES_FILE).read_text().splitlines()]
    turns = {s["prompt_id"]: s["output_text"] for s in samples
             if s["category"] == SELF_PROMPT and s["finish_reason"] == "stop"}
    answered = [s for s in samples if s["category"] == "self-written"]
    assert len(answered) == len(self_written_prompts(turns))
    # chat prompts, documents, document prompts, user turns the target wrote, their answers
    assert len(samples) == 12 + 2 + 2 + 6 + len(answered)
    for s in samples:  # answers carry the target's distributions; the turns it wrote do not
        assert len(s["top_ids"]) == (0 if s["category"] == SELF_PROMPT else len(s["output_ids"]))
    assert "validation_top1_agreement" in capsys.readouterr().out

    assert main(args) == 0  # resumes: nothing is generated twice
    assert len((work / SAMPLES_FILE).read_text().splitlines()) == len(samples)

    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 200 and config["num_hidden_layers"] == 1
    assert config["architectures"] == ["EagleLlamaDraft" if method == "eagle" else "LlamaForCausalLM"]
    assert (work / FEATURES_FILE).is_file() == (method == "eagle")
    assert len(json.loads((out / "draft_vocab.json").read_text())["target_ids"]) == 199
    if method == "eagle":  # the written head loads back as saved
        head = load_head(out)
        assert all(torch.equal(head.state_dict()[k], v.float()) for k, v in load_file(out / "model.safetensors").items())

    spec = SpeculativeConfig(draft_model=str(out), budget=TreeBudget(depth=3, width=2))
    engine = LLMEngine(
        EngineConfig(model=str(tiny_model), max_num_seqs=4, max_model_len=256, speculative=spec, control=ControlConfig(policy="fixed"))
    )
    plain = LLMEngine(EngineConfig(model=str(tiny_model), max_num_seqs=4, max_model_len=256))
    assert [o.output.token_ids for o in run(engine, PROMPTS, GREEDY)] == [
        o.output.token_ids for o in run(plain, PROMPTS, GREEDY)
    ]


def test_a_draft_trains_further_from_where_it_stopped(tiny_model, tmp_path, capsys):
    work, first, second = tmp_path / "work", tmp_path / "first", tmp_path / "second"
    args = ["distill", "--model", str(tiny_model), "--work", str(work), "--num-prompts", "8", "--num-documents", "1",
            "--max-new-tokens", "12", "--document-tokens", "16", "--batch-size", "8", "--layers", "0",
            "--draft-vocab", "150", "--epochs", "1"]
    assert main([*args, "--out", str(first)]) == 0
    vocabulary, draft = load_draft(first)
    assert len(vocabulary) == 149 and draft.config.num_hidden_layers == 1
    saved = {k: v.float() for k, v in load_file(first / "model.safetensors").items()}
    assert all(torch.equal(draft.state_dict()[k], v) for k, v in saved.items())

    # --layers and --draft-vocab are the first draft's, whatever the command line says
    assert main([*args, "--layers", "0", "1", "--draft-vocab", "99", "--init", str(first), "--out", str(second)]) == 0
    assert load_draft(second)[0] == vocabulary
    assert json.loads((second / "config.json").read_text())["num_hidden_layers"] == 1
    assert f"started_from: {first}" in capsys.readouterr().out

    assert main([*args, "--method", "eagle", "--init", str(first), "--out", str(second)]) == 2
    assert main([*args, "--init", str(work), "--out", str(second)]) == 2
    assert "no draft_vocab.json" in capsys.readouterr().err


def test_training_prompts_are_distinct_and_never_spec_bench():
    prompts = chat_prompts(500, seed=0)
    texts = [p.text for p in prompts]
    assert len(set(texts)) == len(texts) == 500
    assert len({p.category for p in prompts}) >= 9
    assert not any("Pfandhäuser" in t or "Hawaii" in t for t in texts)


def test_the_target_writes_user_turns_from_the_start_of_one(tiny_model):
    engine = LLMEngine(EngineConfig(model=str(tiny_model), max_num_seqs=2, max_model_len=128))
    prefix = user_turn_prefix(engine)
    conversation = engine.apply_chat_template([{"role": "user", "content": "Tell me about tides."}])
    assert prefix and conversation[: len(prefix)] == prefix
    assert engine.tokenizer.decode(conversation[len(prefix):]).startswith("Tell me about tides.")


def test_self_written_prompts_are_distinct_and_not_too_short():
    turns = {"t0": " How do tides work? ", "t1": "How do tides work?", "t2": "Hi", "t3": "Write a poem about rain."}
    prompts = self_written_prompts(turns)
    assert [p.text for p in prompts] == ["How do tides work?", "Write a poem about rain."]
    assert [p.prompt_id for p in prompts] == ["self-written-t0", "self-written-t3"]


def test_a_run_killed_mid_write_loses_only_its_unfinished_sample(tiny_model, tmp_path):
    work = tmp_path / "work"
    args = ["distill", "--stage", "data", "--model", str(tiny_model), "--work", str(work),
            "--num-prompts", "4", "--num-documents", "0", "--max-new-tokens", "6", "--batch-size", "4"]
    assert main(args) == 0
    path = work / SAMPLES_FILE
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:20])  # the last sample half written
    assert len(list(read_samples(work))) == len(lines) - 1
    assert main(args) == 0  # answers the lost prompt again, on a line of its own
    again = path.read_text().splitlines()
    assert len(again) == len(lines) and all(json.loads(line) for line in again)


def test_documents_are_sampled_with_distributions_and_each_seed_writes_new_ones(tiny_engine):
    document = Prompt("document-s0-3", "document", "Write a detailed news article about glaciers.")
    _, first = _request(tiny_engine, document, DataConfig(seed=0), [])
    _, second = _request(tiny_engine, document, DataConfig(seed=1), [])
    assert first.temperature == DOCUMENT_TEMPERATURE > 0 and first.logprobs == DataConfig.top_logprobs
    assert first.seed != second.seed
    _, answer = _request(tiny_engine, Prompt("qa-s0-3", "qa", "Who wrote Hamlet?"), DataConfig(seed=0), [])
    assert answer.temperature == 0.0


def test_long_documents_are_cut_at_sentence_ends_keeping_paragraphs():
    text = "One two three. Four five six! Seven eight?\n\nNine ten. " + "x" * 40 + "."
    passages = split_passages(text, max_chars=30)
    assert passages == ["One two three. Four five six!", "Seven eight?\n\nNine ten.", "x" * 40 + "."]
    assert split_passages(text, max_chars=200) == [text]


def test_outside_documents_are_asked_about_and_each_seed_draws_other_passages(tiny_model, tmp_path, capsys):
    documents = tmp_path / "documents.jsonl"
    articles = [f"Article {i} reports on harbour number {i}. " * 12 for i in range(6)]
    documents.write_text("".join(json.dumps({"text": a, "source": "test"}) + "\n" for a in articles))
    work = tmp_path / "work"
    args = ["distill", "--stage", "data", "--model", str(tiny_model), "--work", str(work), "--num-prompts", "0",
            "--num-documents", "0", "--max-new-tokens", "4", "--batch-size", "4", "--documents", str(documents),
            "--num-corpus-documents", "3"]
    assert main(args) == 0
    samples = list(read_samples(work))
    assert len(samples) == 3 and all(s["top_ids"] for s in samples)
    assert {s["category"] for s in samples} <= {category for category, _ in CORPUS_TASKS}

    passages = [a.strip() for a in articles]
    first, second = corpus_prompts(passages, 3, seed=0), corpus_prompts(passages, 3, seed=1)
    assert first == corpus_prompts(passages, 3, seed=0)  # resumable: the same draw every time
    assert {p.prompt_id for p in first}.isdisjoint(p.prompt_id for p in second)
    assert all(sum(passage in p.text for passage in passages) == 1 for p in first)
    assert corpus_prompts(passages, -1, seed=0) == [] and len(corpus_prompts(passages, 99, seed=0)) == 6

    documents.write_text('{"text": "fine"}\n["not", "an", "object"]\n')
    assert main(args) == 2
    assert f"{documents}:2" in capsys.readouterr().err
    assert main([*args[:-3], str(tmp_path / "missing.jsonl"), *args[-2:]]) == 2


def test_repeated_answers_are_trained_on_once():
    sample = {"prompt_ids": [1, 2], "output_ids": [3, 4], "top_ids": [[3], [4]], "top_logprobs": [[0.0], [0.0]]}
    other_answer = {**sample, "output_ids": [3, 5], "top_ids": [[3], [5]]}
    turn = {**sample, "prompt_ids": [7], "top_ids": []}  # a user turn the target wrote: no distributions
    assert with_distributions([sample, dict(sample), other_answer, turn]) == [sample, other_answer]


def test_training_stops_when_its_time_is_up():
    model = torch.nn.Linear(2, 1)
    plan = [[[torch.ones(2)]] * 5] * 2  # two epochs of five batches

    def batch_loss(batch):
        return model(batch[0]).sum(), {}

    assert optimize(model, plan, 1e-3, batch_loss, "test") == 10
    assert optimize(model, plan, 1e-3, batch_loss, "test", max_seconds=0.0) == 0
