"""`specserve distill` end to end on a tiny target: data (resumable), training, a usable draft."""

from __future__ import annotations

import json

import pytest

from specserve.cli import main
from specserve.config import ControlConfig, EngineConfig, SpeculativeConfig
from specserve.distill.data import SAMPLES_FILE
from specserve.distill.eagle import FEATURES_FILE
from specserve.distill.prompts import chat_prompts
from specserve.engine.llm_engine import LLMEngine
from specserve.spec.tree import TreeBudget
from test_engine import GREEDY, run
from tiny_models import PROMPTS


@pytest.mark.parametrize("method", ["eagle", "model"])
def test_distill_writes_a_draft_the_engine_can_speculate_with(tiny_model, tmp_path, capsys, method):
    work, out = tmp_path / "work", tmp_path / "draft"
    args = ["distill", "--method", method, "--model", str(tiny_model), "--work", str(work), "--out", str(out),
            "--num-prompts", "12", "--num-documents", "2", "--max-new-tokens", "12", "--document-tokens", "24",
            "--batch-size", "8", "--layers", "0", "--draft-vocab", "200", "--epochs", "2"]
    assert main(args) == 0
    samples = [json.loads(line) for line in (work / SAMPLES_FILE).read_text().splitlines()]
    assert len(samples) == 12 + 2 + 2  # chat prompts, documents, document prompts
    assert all(len(s["top_ids"]) == len(s["output_ids"]) for s in samples)
    assert "validation_top1_agreement" in capsys.readouterr().out

    assert main(args) == 0  # resumes: nothing is generated twice
    assert len((work / SAMPLES_FILE).read_text().splitlines()) == len(samples)

    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 200 and config["num_hidden_layers"] == 1
    assert config["architectures"] == ["EagleLlamaDraft" if method == "eagle" else "LlamaForCausalLM"]
    assert (work / FEATURES_FILE).is_file() == (method == "eagle")
    assert len(json.loads((out / "draft_vocab.json").read_text())["target_ids"]) == 199

    spec = SpeculativeConfig(draft_model=str(out), budget=TreeBudget(depth=3, width=2))
    engine = LLMEngine(
        EngineConfig(model=str(tiny_model), max_num_seqs=4, max_model_len=256, speculative=spec, control=ControlConfig(policy="fixed"))
    )
    plain = LLMEngine(EngineConfig(model=str(tiny_model), max_num_seqs=4, max_model_len=256))
    assert [o.output.token_ids for o in run(engine, PROMPTS, GREEDY)] == [
        o.output.token_ids for o in run(plain, PROMPTS, GREEDY)
    ]


def test_training_prompts_are_distinct_and_never_spec_bench():
    prompts = chat_prompts(500, seed=0)
    texts = [p.text for p in prompts]
    assert len(set(texts)) == len(texts) == 500
    assert len({p.category for p in prompts}) >= 9
    assert not any("Pfandhäuser" in t or "Hawaii" in t for t in texts)
