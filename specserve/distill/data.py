"""Distillation data: the target's own answers, with its top-k log-probabilities per token.

Samples are appended to ``samples.jsonl`` in the work directory as requests finish, so an
interrupted run resumes where it stopped (prompts already answered are skipped).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from specserve.distill.prompts import Prompt, chat_prompts, document_prompts, document_requests
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.sampling_params import SamplingParams

SAMPLES_FILE = "samples.jsonl"


@dataclass(frozen=True)
class DataConfig:
    num_prompts: int = 1200
    num_documents: int = 150
    max_new_tokens: int = 192
    document_tokens: int = 320
    top_logprobs: int = 20
    batch_size: int = 32
    seed: int = 0


def read_samples(work_dir: Path) -> Iterator[dict]:
    path = work_dir / SAMPLES_FILE
    if path.is_file():
        with path.open() as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def generate_dataset(engine: LLMEngine, work_dir: Path, config: DataConfig) -> Path:
    """Answer every prompt greedily with the target; returns the samples file."""
    work_dir.mkdir(parents=True, exist_ok=True)
    done = {s["prompt_id"]: s for s in read_samples(work_dir)}
    first_round = document_requests(config.num_documents, config.seed) + chat_prompts(
        config.num_prompts, config.seed
    )
    _answer(engine, work_dir, [p for p in first_round if p.prompt_id not in done], config, "round 1")
    done = {s["prompt_id"]: s for s in read_samples(work_dir)}
    documents = {
        s["prompt_id"]: s["output_text"]
        for s in done.values()
        if s["category"] == "document" and s["prompt_id"].startswith(f"document-s{config.seed}-")
    }
    second_round = document_prompts(documents, config.seed)
    _answer(engine, work_dir, [p for p in second_round if p.prompt_id not in done], config, "round 2")
    return work_dir / SAMPLES_FILE


def _answer(
    engine: LLMEngine, work_dir: Path, prompts: list[Prompt], config: DataConfig, label: str
) -> None:
    if not prompts:
        return
    pending = list(reversed(prompts))
    by_id: dict[str, Prompt] = {}
    with (work_dir / SAMPLES_FILE).open("a") as out, tqdm(total=len(prompts), desc=label) as bar:
        while pending or engine.has_unfinished_requests():
            while pending and len(by_id) < config.batch_size:
                prompt = pending.pop()
                max_tokens = config.document_tokens if prompt.category == "document" else config.max_new_tokens
                ids = engine.apply_chat_template([{"role": "user", "content": prompt.text}])
                room = engine.max_model_len - len(ids)
                if room < 1:
                    bar.update()  # a document prompt longer than the model's context
                    continue
                params = SamplingParams(
                    max_tokens=min(max_tokens, room),
                    temperature=0.0,
                    logprobs=config.top_logprobs,
                )
                engine.add_request(engine.make_request(prompt.prompt_id, ids, params))
                by_id[prompt.prompt_id] = prompt
            for output in engine.step():
                if not output.finished:
                    continue
                prompt = by_id.pop(output.request_id)
                logprobs = output.output.logprobs or []
                sample = {
                    "prompt_id": prompt.prompt_id,
                    "category": prompt.category,
                    "prompt_ids": output.prompt_token_ids,
                    "output_ids": output.output.token_ids,
                    "output_text": output.output.text,
                    "top_ids": [list(row) for row in logprobs],
                    "top_logprobs": [[round(v, 4) for v in row.values()] for row in logprobs],
                }
                out.write(json.dumps(sample) + "\n")
                out.flush()
                bar.update()
