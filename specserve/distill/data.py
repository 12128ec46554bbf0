"""Distillation data: the target's own answers, with its top-k log-probabilities per token.

Two rounds: the first answers template prompts, writes documents (sampled, so that every seed
writes new ones) and samples user turns the target writes itself (``SELF_PROMPT`` samples, kept
without log-probabilities: they are prompts, not answers to learn); the second asks about the
documents and answers those turns. Passages of an outside corpus (``corpus.read_passages``), if
given, are asked about in the first round.
Samples are appended to ``samples.jsonl`` in the work directory as requests finish, so an
interrupted run resumes where it stopped (prompts already answered are skipped).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from specserve.distill.prompts import (
    SELF_PROMPT,
    Prompt,
    chat_prompts,
    corpus_prompts,
    document_prompts,
    document_requests,
    self_prompt_requests,
    self_written_prompts,
)
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.sampling_params import SamplingParams

SAMPLES_FILE = "samples.jsonl"
DOCUMENT_TEMPERATURE = 0.8


@dataclass(frozen=True)
class DataConfig:
    num_prompts: int = 1200
    num_documents: int = 150
    num_self_prompts: int = 0
    max_new_tokens: int = 192
    document_tokens: int = 320
    self_prompt_tokens: int = 128
    top_logprobs: int = 20
    batch_size: int = 32
    seed: int = 0
    num_corpus_documents: int = 300  # passages of the outside corpus asked about, if one is given


def read_samples(work_dir: Path) -> Iterator[dict]:
    path = work_dir / SAMPLES_FILE
    if path.is_file():
        with path.open() as f:
            for line in f:
                if line.endswith("\n"):  # a run killed mid-write leaves its last line unfinished
                    yield json.loads(line)


def _drop_unfinished_line(path: Path) -> None:
    """Cut an unfinished last line (a run killed mid-write) so appending starts on a new line."""
    if not path.is_file():
        return
    with path.open("r+b") as f:
        end = f.seek(0, 2)
        start = end
        while start > 0:  # back to the last newline, a block at a time
            start = max(0, start - (1 << 20))
            f.seek(start)
            block = f.read(end - start)
            if block.endswith(b"\n"):
                return
            if b"\n" in block:
                f.truncate(start + block.rfind(b"\n") + 1)
                return
        f.truncate(0)


def generate_dataset(
    engine: LLMEngine, work_dir: Path, config: DataConfig, passages: list[str] | None = None
) -> Path:
    """Answer every prompt greedily with the target, and prompts over ``passages`` of an outside
    corpus if given; returns the samples file."""
    work_dir.mkdir(parents=True, exist_ok=True)
    _drop_unfinished_line(work_dir / SAMPLES_FILE)
    done = {s["prompt_id"]: s for s in read_samples(work_dir)}
    first_round = (
        self_prompt_requests(config.num_self_prompts, config.seed)
        + document_requests(config.num_documents, config.seed)
        + chat_prompts(config.num_prompts, config.seed)
    )
    if passages:
        first_round += corpus_prompts(passages, config.num_corpus_documents, config.seed)
    _answer(engine, work_dir, [p for p in first_round if p.prompt_id not in done], config, "round 1")
    done = {s["prompt_id"]: s for s in read_samples(work_dir)}
    second_round = document_prompts(_outputs(done, "document", config.seed), config.seed) + self_written_prompts(
        _outputs(done, SELF_PROMPT, config.seed, finished_only=True)
    )
    _answer(engine, work_dir, [p for p in second_round if p.prompt_id not in done], config, "round 2")
    return work_dir / SAMPLES_FILE


def _outputs(samples: dict[str, dict], category: str, seed: int, finished_only: bool = False) -> dict[str, str]:
    """Output texts of this seed's samples of ``category``, by prompt id; ``finished_only`` drops
    the ones cut at their token limit."""
    return {
        s["prompt_id"]: s["output_text"]
        for s in samples.values()
        if s["category"] == category
        and s["prompt_id"].startswith(f"{category}-s{seed}-")
        and not (finished_only and s.get("finish_reason") != "stop")
    }


def user_turn_prefix(engine: LLMEngine) -> list[int]:
    """The chat template's tokens up to where a user's message begins."""
    marker = "\u2063user turn\u2063"
    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return engine.tokenizer.encode(text[: text.index(marker)], add_special_tokens=False)


def _request(
    engine: LLMEngine, prompt: Prompt, config: DataConfig, user_prefix: list[int]
) -> tuple[list[int], SamplingParams]:
    """Prompt ids and sampling parameters. Template prompts are answered greedily with the
    target's top-k log-probabilities; documents are sampled with them (at
    ``DOCUMENT_TEMPERATURE``, so that every seed writes new ones); a self-prompt request samples
    a user turn after ``user_prefix`` (``user_turn_prefix``)."""
    if prompt.category == SELF_PROMPT:
        params = SamplingParams(max_tokens=config.self_prompt_tokens, temperature=1.0,
                                seed=_sampling_seed(prompt, config), output_kind="final_only")
        return user_prefix, params
    if prompt.category == "document":
        params = SamplingParams(max_tokens=config.document_tokens, temperature=DOCUMENT_TEMPERATURE,
                                seed=_sampling_seed(prompt, config), logprobs=config.top_logprobs,
                                output_kind="final_only")
    else:
        params = SamplingParams(max_tokens=config.max_new_tokens, temperature=0.0, logprobs=config.top_logprobs,
                                output_kind="final_only")
    return engine.apply_chat_template([{"role": "user", "content": prompt.text}]), params


def _sampling_seed(prompt: Prompt, config: DataConfig) -> int:
    """A sampled request's own seed, from the run's seed and the prompt's index."""
    return config.seed * 1_000_003 + int(prompt.prompt_id.rsplit("-", 1)[1])


def _answer(
    engine: LLMEngine, work_dir: Path, prompts: list[Prompt], config: DataConfig, label: str
) -> None:
    if not prompts:
        return
    user_prefix = user_turn_prefix(engine)  # once, not per request
    pending = list(reversed(prompts))
    by_id: dict[str, Prompt] = {}
    with (work_dir / SAMPLES_FILE).open("a") as out, tqdm(total=len(prompts), desc=label) as bar:
        while pending or engine.has_unfinished_requests():
            while pending and len(by_id) < config.batch_size:
                prompt = pending.pop()
                ids, params = _request(engine, prompt, config, user_prefix)
                room = engine.max_model_len - len(ids)
                if room < 1:
                    bar.update()  # a document prompt longer than the model's context
                    continue
                params = params.model_copy(update={"max_tokens": min(params.max_tokens, room)})
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
                    "finish_reason": output.output.finish_reason.value,
                    "top_ids": [list(row) for row in logprobs],
                    "top_logprobs": [[round(v, 4) for v in row.values()] for row in logprobs],
                }
                out.write(json.dumps(sample) + "\n")
                out.flush()
                bar.update()
