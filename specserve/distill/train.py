"""Train a small draft toward the target's next-token distributions.

The draft is a Llama model of the target's width with a few of the target's layers as its
starting point and a reduced vocabulary: the ``vocab_size - 1`` tokens the target emits most
often, plus one row for every other token (fed as input, never proposed). The tied 49,152-word
head would otherwise dominate a small draft's step. The loss is the cross-entropy between the
target's (renormalized top-k) distribution at each answer position and the draft's.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from specserve.spec.draft_model import read_draft_vocabulary, write_draft_vocabulary


@dataclass(frozen=True)
class TrainConfig:
    layers: tuple[int, ...] = (0, 1)  # target layers the draft starts from
    vocab_size: int = 8192
    epochs: int = 8
    batch_tokens: int = 4096
    max_len: int = 768
    lr: float = 1e-3
    validation_share: float = 0.05
    seed: int = 0
    device: str = "cpu"  # training runs in bfloat16 autocast on CUDA
    max_seconds: float | None = None  # stop early, the schedule ending with the time
    init: Path | None = None  # a saved draft to train further (its layers and vocabulary)


@dataclass
class Example:
    prompt_id: str
    input_ids: torch.Tensor  # [T] draft ids of prompt + answer
    answer_start: int  # index of the first position whose next token is an answer token
    top_ids: torch.Tensor  # [A, k] draft ids of the target's top-k, per answer token
    top_probs: torch.Tensor  # [A, k] their renormalized probabilities (0 where a row had fewer)


def choose_vocabulary(samples: list[dict], size: int) -> list[int]:
    """The ``size - 1`` target ids seen most often (answers weigh more than prompts)."""
    counts: Counter[int] = Counter()
    for s in samples:
        counts.update(s["prompt_ids"])
        for ids in s["top_ids"]:
            counts.update({t: 4 for t in ids[:1]})
            counts.update(ids[1:4])
    return [t for t, _ in counts.most_common(size - 1)]


def _rows(rows: list[list[int]] | list[list[float]], fill: float) -> torch.Tensor:
    """Ragged rows as one tensor, short rows padded with ``fill``."""
    width = max(map(len, rows))
    return torch.tensor([list(r) + [fill] * (width - len(r)) for r in rows])


def make_examples(samples: list[dict], to_draft: torch.Tensor, max_len: int) -> list[Example]:
    examples = []
    for s in samples:
        ids = (s["prompt_ids"] + s["output_ids"])[:max_len]
        answers = len(ids) - len(s["prompt_ids"])
        if answers <= 0:
            continue
        probs = _rows(s["top_logprobs"][:answers], -math.inf).exp()
        examples.append(
            Example(
                prompt_id=s["prompt_id"],
                input_ids=to_draft[torch.tensor(ids)],
                answer_start=len(s["prompt_ids"]) - 1,
                top_ids=to_draft[_rows(s["top_ids"][:answers], 0)],
                top_probs=probs / probs.sum(-1, keepdim=True),
            )
        )
    return examples


def batches(examples: list[Example], batch_tokens: int, rng: random.Random) -> list[list[Example]]:
    """Length-bucketed batches of about ``batch_tokens`` (padded) tokens, in random order."""
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    out, current = [], []
    for example in ordered:
        if current and len(example.input_ids) * (len(current) + 1) > batch_tokens:
            out.append(current)
            current = []
        current.append(example)
    if current:
        out.append(current)
    rng.shuffle(out)
    return out


def _collate(
    batch: list[Example], vocab: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded inputs, attention mask, answer positions [P, 2] (row, index) and their soft
    targets [P, vocab], on ``device``."""
    length = max(len(e.input_ids) for e in batch)
    ids = torch.zeros(len(batch), length, dtype=torch.long)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    for b, e in enumerate(batch):
        ids[b, : len(e.input_ids)] = e.input_ids
        mask[b, : len(e.input_ids)] = 1
    index = torch.cat([
        torch.stack([torch.full((len(e.top_ids),), b), e.answer_start + torch.arange(len(e.top_ids))], dim=1)
        for b, e in enumerate(batch)
    ])
    k = max(e.top_ids.shape[1] for e in batch)
    top_ids = torch.cat([F.pad(e.top_ids, (0, k - e.top_ids.shape[1])) for e in batch]).to(device)
    top_probs = torch.cat([F.pad(e.top_probs, (0, k - e.top_probs.shape[1])) for e in batch]).to(device)
    # Target ids outside the draft vocabulary share its last row, so their mass adds up there.
    targets = torch.zeros(len(index), vocab, device=device).scatter_add_(1, top_ids, top_probs)
    return ids.to(device), mask.to(device), index.to(device), targets


def build_draft(target_path: Path, vocabulary: list[int], layers: tuple[int, ...]) -> LlamaForCausalLM:
    """A draft of the target's width: the chosen target layers, the vocabulary's embedding rows
    (tied head) and an unknown-token row (the mean embedding)."""
    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32)
    target_config = AutoConfig.from_pretrained(target_path)
    n = target_config.num_hidden_layers
    layer_ids = [i % n for i in layers]
    config = LlamaConfig(**{
        **target_config.to_dict(),
        "num_hidden_layers": len(layer_ids),
        "vocab_size": len(vocabulary) + 1,
        "tie_word_embeddings": True,
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    })
    draft = LlamaForCausalLM(config)
    with torch.no_grad():
        embed = target.model.embed_tokens.weight
        draft.model.embed_tokens.weight.copy_(torch.cat([embed[vocabulary], embed.mean(0, keepdim=True)]))
        for mine, theirs in zip(draft.model.layers, layer_ids):
            mine.load_state_dict(target.model.layers[theirs].state_dict())
        draft.model.norm.load_state_dict(target.model.norm.state_dict())
    return draft


def load_draft(path: Path) -> tuple[list[int], LlamaForCausalLM]:
    """The vocabulary (target ids) and model of a draft ``save_draft`` wrote, to train further."""
    return read_draft_vocabulary(path), LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)


def top1_matches(logits: torch.Tensor, targets: torch.Tensor) -> int:
    """Positions where the draft's best token is the target's. The draft's last row is the
    unknown token, which it never proposes, so it never counts as a match."""
    return (logits[:, :-1].argmax(-1) == targets.argmax(-1)).sum().item()


def _loss(draft: LlamaForCausalLM, batch: list[Example], vocab: int) -> tuple[torch.Tensor, int, int]:
    device = draft.device
    ids, mask, index, targets = _collate(batch, vocab, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        hidden = draft.model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = draft.lm_head(hidden[index[:, 0], index[:, 1]]).float()
    loss = -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    return loss, top1_matches(logits, targets), len(index)


def with_distributions(samples: list[dict]) -> list[dict]:
    """The distinct samples that carry the target's distributions (user turns it wrote itself
    carry none). Seeds draw some template prompts again, and their greedy answers repeat."""
    distinct = {(tuple(s["prompt_ids"]), tuple(s["output_ids"])): s for s in samples if s["top_ids"]}
    return list(distinct.values())


def split_samples(
    samples: list[dict], vocabulary: list[int], target_path: Path, max_len: int, validation_share: float,
    rng: random.Random,
) -> tuple[list[Example], list[Example]]:
    """Training and validation examples of ``samples`` (``with_distributions``' output; shuffled
    in place) in the draft ``vocabulary`` (target ids)."""
    to_draft = torch.full((AutoConfig.from_pretrained(target_path).vocab_size,), len(vocabulary))
    to_draft[torch.tensor(vocabulary)] = torch.arange(len(vocabulary))
    rng.shuffle(samples)
    n_val = max(1, int(len(samples) * validation_share))
    return make_examples(samples[n_val:], to_draft, max_len), make_examples(samples[:n_val], to_draft, max_len)


def optimize(
    model: nn.Module,
    plan: list[list[list[Example]]],
    lr: float,
    batch_loss: Callable[[list[Example]], tuple[torch.Tensor, dict[str, str]]],
    desc: str,
    max_seconds: float | None = None,
) -> int:
    """AdamW over ``model``'s trainable parameters, one step per batch of the epochs' ``plan``,
    with a 50-step warm-up, a cosine decay and gradient clipping; ``batch_loss`` returns the
    loss and what the progress bar shows. With ``max_seconds`` the run stops when that time is
    up, the schedule following whichever of steps or time runs out first. Returns the steps run."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = sum(len(p) for p in plan)
    start = time.monotonic()

    def progress(step: int) -> float:
        done = step / total
        if max_seconds is not None:
            elapsed = time.monotonic() - start
            done = max(done, elapsed / max_seconds if elapsed < max_seconds else 1.0)
        return min(done, 1.0)

    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * progress(step)))
    )
    model.train()
    steps = 0
    with tqdm(total=total, desc=desc) as bar:
        for batch in itertools.chain.from_iterable(plan):
            if progress(steps) >= 1.0:
                break
            loss, shown = batch_loss(batch)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", **shown)
            bar.update()
            steps += 1
    return steps


def train_draft(samples: list[dict], target_path: Path, out_dir: Path, config: TrainConfig) -> dict:
    """Train and save the draft as an HF directory; returns a summary (also in the model card)."""
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    samples = with_distributions(samples)
    if config.init is None:
        vocabulary = choose_vocabulary(samples, config.vocab_size)
        draft = build_draft(target_path, vocabulary, config.layers)
    else:
        vocabulary, draft = load_draft(config.init)
    draft = draft.to(config.device)
    train, val = split_samples(samples, vocabulary, target_path, config.max_len, config.validation_share, rng)
    vocab = len(vocabulary) + 1
    before = evaluate(draft, val, vocab, config.batch_tokens)

    def batch_loss(batch: list[Example]) -> tuple[torch.Tensor, dict[str, str]]:
        loss, agree, count = _loss(draft, batch, vocab)
        return loss, {"top1": f"{agree / count:.2f}"}

    plan = [batches(train, config.batch_tokens, rng) for _ in range(config.epochs)]
    steps = optimize(draft, plan, config.lr, batch_loss, "training draft", config.max_seconds)
    after = evaluate(draft, val, vocab, config.batch_tokens)
    summary = {
        "train_samples": len(train),
        "train_answer_tokens": sum(len(e.top_ids) for e in train),
        "samples_by_category": dict(Counter(s["category"] for s in samples)),
        "validation_samples": len(val),
        "draft_vocab": vocab,
        "started_from": f"target layers {list(config.layers)}" if config.init is None else str(config.init),
        "epochs": config.epochs,
        "training_steps": f"{steps} of {sum(map(len, plan))}",
        "validation_top1_agreement_before": before["top1"],
        "validation_top1_agreement": after["top1"],
        "validation_loss": after["loss"],
    }
    save_draft(draft, vocabulary, out_dir, summary)
    return summary


@torch.no_grad()
def evaluate(draft: LlamaForCausalLM, examples: list[Example], vocab: int, batch_tokens: int) -> dict:
    """Top-1 agreement with the target and mean loss on held-out answers."""
    draft.eval()
    loss_sum, agree, count = 0.0, 0, 0
    for batch in batches(examples, batch_tokens, random.Random(0)):
        loss, a, n = _loss(draft, batch, vocab)
        loss_sum += loss.item() * n
        agree += a
        count += n
    draft.train()
    return {"top1": agree / max(count, 1), "loss": loss_sum / max(count, 1)}


def save_draft(draft: LlamaForCausalLM, vocabulary: list[int], out_dir: Path, summary: dict) -> None:
    """An HF model directory (config, bf16 safetensors) plus the vocabulary map; the draft uses
    the target's tokenizer, so none is copied."""
    out_dir.mkdir(parents=True, exist_ok=True)
    draft.to(torch.bfloat16).save_pretrained(out_dir)
    write_draft_vocabulary(out_dir, vocabulary)
    (out_dir / "README.md").write_text(
        "# SpecServe default draft\n\nDistilled by `specserve distill` from the target's own "
        "greedy answers to template prompts and to user turns it wrote itself (no Spec-Bench data)."
        "\n\n```json\n"
        + json.dumps(summary, indent=2) + "\n```\n"
    )
