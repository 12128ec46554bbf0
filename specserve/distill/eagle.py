"""Train an EAGLE draft head (``models/eagle.py``) on the target's own answers and features.

The target's final-norm hidden states of every distillation sample are computed once (and
cached in the work directory). The head reads ``[embedding(token_i) ; f_{i-1}]`` and learns to
predict ``f_i`` (smooth-L1) and, at answer positions, the target's next-token distribution
(cross-entropy toward its renormalised top-k, over the draft vocabulary). Beyond the root a
drafting head reads its own predictions, so each batch runs a second pass that feeds the first
pass's predictions as input features and trains on the same targets (EAGLE-3's training-time
test, one step deep). The embedding / tied head start as the target's rows for the draft
vocabulary and are frozen unless ``train_embedding`` (the head then predicts features in the
target's own space).

The head starts as the target cut down to its first layers: decoder layers copied from the
target, its final norm, and ``fc`` passing the token embedding through while the feature half
starts at zero, so training begins from a (weak) language model and learns to read the features.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from specserve.distill.train import (
    Example,
    _collate,
    batches,
    choose_vocabulary,
    optimize,
    split_samples,
    top1_matches,
    with_distributions,
)
from specserve.models.eagle import EAGLE_ARCHITECTURE
from specserve.spec.draft_model import write_draft_vocabulary

FEATURES_FILE = "target_features.pt"


@dataclass(frozen=True)
class EagleTrainConfig:
    vocab_size: int = 8192
    epochs: int = 4
    batch_tokens: int = 4096
    max_len: int = 768
    lr: float = 1e-3
    feature_weight: float = 0.1  # weight of the feature regression next to the cross-entropy
    layers: tuple[int, ...] = (0, 1)  # the target layers the head's decoder layers start from
    train_embedding: bool = False  # tune the (tied) embedding rows too, or keep the target's
    validation_share: float = 0.05
    seed: int = 0
    device: str = "cpu"  # features and training; training runs in bfloat16 autocast on CUDA
    max_seconds: float | None = None  # stop training early, the schedule ending with the time


class EagleHead(nn.Module):
    """The trainable twin of ``models/eagle.py``'s EagleDraftModel (same tensor names)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(hidden, config.rms_norm_eps)
        self.rotary = LlamaRotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Predicted features [B, T, hidden] from draft ids [B, T] and input features [B, T, hidden]
        (right padding only: attention is causal, so padding never reaches a real position)."""
        x = self.fc(torch.cat([self.embed_tokens(input_ids), features], dim=-1))
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        rope = self.rotary(x, positions)
        for layer in self.layers:
            x = layer(x, position_ids=positions, position_embeddings=rope)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.embed_tokens.weight.T


def head_config(target_path: Path, vocab_size: int, num_layers: int = 1) -> LlamaConfig:
    target = AutoConfig.from_pretrained(target_path).to_dict()
    config = LlamaConfig(**{
        **target,
        "num_hidden_layers": num_layers,
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,
        "architectures": [EAGLE_ARCHITECTURE],
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    })
    config._attn_implementation = "sdpa"
    return config


def build_head(target_path: Path, vocabulary: list[int], layers: tuple[int, ...]) -> EagleHead:
    """A head over the target's embedding rows for ``vocabulary`` (plus a mean unknown row) that
    starts as the target's ``layers`` and final norm, ``fc`` passing the embedding through."""
    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32)
    head = EagleHead(head_config(target_path, len(vocabulary) + 1, len(layers)))
    hidden = head.config.hidden_size
    with torch.no_grad():
        embed = target.model.embed_tokens.weight
        head.embed_tokens.weight.copy_(torch.cat([embed[vocabulary], embed.mean(0, keepdim=True)]))
        for mine, theirs in zip(head.layers, layers):
            mine.load_state_dict(target.model.layers[theirs].state_dict())
        head.norm.load_state_dict(target.model.norm.state_dict())
        head.fc.weight.zero_()
        head.fc.weight[:, :hidden] = torch.eye(hidden)
    return head


@torch.no_grad()
def target_features(
    samples: list[dict], target_path: Path, work_dir: Path, max_len: int, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """The target's final-norm hidden states [T, hidden] (float16) of every sample's first
    ``max_len`` tokens, by prompt id; computed once, then read from the work directory."""
    cache = work_dir / FEATURES_FILE
    features: dict[str, torch.Tensor] = torch.load(cache) if cache.is_file() else {}
    todo = [s for s in samples if s["prompt_id"] not in features]
    if not todo:
        return features
    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).to(device).eval()
    todo.sort(key=lambda s: len(s["prompt_ids"]) + len(s["output_ids"]))
    batch: list[dict] = []
    with tqdm(total=len(todo), desc="target features") as bar:
        for i, sample in enumerate(todo):
            batch.append(sample)
            length = min(max_len, len(sample["prompt_ids"]) + len(sample["output_ids"]))
            if length * len(batch) < 4096 and i + 1 < len(todo):
                continue
            ids = [(s["prompt_ids"] + s["output_ids"])[:max_len] for s in batch]
            width = max(map(len, ids))
            input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
            hidden = target.model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            for s, x, h in zip(batch, ids, hidden.half().cpu()):
                features[s["prompt_id"]] = h[: len(x)].clone()
            bar.update(len(batch))
            batch = []
    torch.save(features, cache)
    return features


def load_head(path: Path) -> EagleHead:
    """A head written by ``save_head``, in float32."""
    config = LlamaConfig.from_pretrained(path)
    config._attn_implementation = "sdpa"
    head = EagleHead(config)
    head.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
    return head.float().eval()


def shifted(features: torch.Tensor) -> torch.Tensor:
    """Input features [B, T, hidden]: position i reads position i-1's (zeros at position 0)."""
    return F.pad(features[:, :-1], (0, 0, 1, 0))


def _batch_features(batch: list[Example], features: dict[str, torch.Tensor], width: int) -> torch.Tensor:
    out = torch.zeros(len(batch), width, features[batch[0].prompt_id].shape[-1])
    for b, e in enumerate(batch):
        f = features[e.prompt_id][: len(e.input_ids)]
        out[b, : len(f)] = f.float()
    return out


def _loss(
    head: EagleHead, batch: list[Example], features: dict[str, torch.Tensor], config: EagleTrainConfig
) -> tuple[torch.Tensor, list[int], int]:
    """Loss of both passes; top-1 agreement with the target per pass; answer positions."""
    device = head.fc.weight.device
    ids, mask, index, targets = _collate(batch, head.config.vocab_size, device)
    wanted = _batch_features(batch, features, ids.shape[1]).to(device)
    valid = mask.bool()
    total, agree = torch.zeros((), device=device), []
    inputs = shifted(wanted)
    for _ in range(2):  # the target's features in, then the head's own predictions
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            predicted = head(ids, inputs).float()
            logits = head.logits(predicted[index[:, 0], index[:, 1]]).float()
        cross_entropy = -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()
        regression = F.smooth_l1_loss(predicted[valid], wanted[valid])
        total = total + cross_entropy + config.feature_weight * regression
        agree.append(top1_matches(logits, targets))
        inputs = shifted(predicted.detach())
    return total, agree, len(index)


@torch.no_grad()
def evaluate(head: EagleHead, examples: list[Example], features: dict[str, torch.Tensor], config: EagleTrainConfig) -> dict:
    head.eval()
    agree, count = [0, 0], 0
    for batch in batches(examples, config.batch_tokens, random.Random(0)):
        _, a, n = _loss(head, batch, features, config)
        agree = [x + y for x, y in zip(agree, a)]
        count += n
    head.train()
    return {"top1": agree[0] / max(count, 1), "top1_own_features": agree[1] / max(count, 1)}


def train_eagle(samples: list[dict], target_path: Path, work_dir: Path, out_dir: Path, config: EagleTrainConfig) -> dict:
    """Train and save an EAGLE head as an HF-style directory; returns a summary."""
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    samples = with_distributions(samples)
    features = target_features(samples, target_path, work_dir, config.max_len, config.device)
    vocabulary = choose_vocabulary(samples, config.vocab_size)
    train, val = split_samples(samples, vocabulary, target_path, config.max_len, config.validation_share, rng)
    head = build_head(target_path, vocabulary, config.layers).to(config.device)
    head.embed_tokens.weight.requires_grad_(config.train_embedding)
    before = evaluate(head, val, features, config)

    def batch_loss(batch: list[Example]) -> tuple[torch.Tensor, dict[str, str]]:
        loss, agree, count = _loss(head, batch, features, config)
        return loss, {"top1": f"{agree[0] / count:.2f}", "own": f"{agree[1] / count:.2f}"}

    plan = [batches(train, config.batch_tokens, rng) for _ in range(config.epochs)]
    steps = optimize(head, plan, config.lr, batch_loss, "training EAGLE head", config.max_seconds)
    after = evaluate(head, val, features, config)
    summary = {
        "method": "eagle",
        "train_samples": len(train),
        "train_answer_tokens": sum(len(e.top_ids) for e in train),
        "training_steps": f"{steps} of {sum(map(len, plan))}",
        "validation_samples": len(val),
        "draft_vocab": head.config.vocab_size,
        "target_layers": list(config.layers),
        "validation_top1_agreement_before": before["top1"],
        "validation_top1_agreement": after["top1"],
        "validation_top1_agreement_own_features": after["top1_own_features"],
        "config": asdict(config),
    }
    save_head(head, vocabulary, out_dir, summary)
    return summary


def save_head(head: EagleHead, vocabulary: list[int], out_dir: Path, summary: dict) -> None:
    """config.json, bf16 model.safetensors (the names ``models/eagle.py`` loads), the vocabulary
    map and a model card; the draft uses the target's tokenizer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    head.config.to_json_file(out_dir / "config.json")
    tensors = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in head.state_dict().items()
               if not k.startswith("rotary.")}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    write_draft_vocabulary(out_dir, vocabulary)
    (out_dir / "README.md").write_text(
        "# SpecServe EAGLE draft head\n\nTrained by `specserve distill --method eagle` on the target's "
        "own greedy answers to template prompts and its features (no Spec-Bench data).\n\n```json\n"
        + json.dumps(summary, indent=2) + "\n```\n"
    )
