"""Load a Llama-family model (weights, config, tokenizer) from a local HF directory."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from specserve.distributed.parallel_state import TensorParallelGroup
from specserve.models.architecture import ModelArchitecture
from specserve.models.eagle import EAGLE_ARCHITECTURE, EagleDraftModel
from specserve.models.kv_cache import DEFAULT_MAX_MODEL_LEN
from specserve.models.layers import apply_kernel_plan
from specserve.models.linear_kernel import KernelPlan, PlanSource, WeightLayout
from specserve.models.llama import LlamaForCausalLM


@dataclass
class ModelFiles:
    """A checked local model directory."""

    path: Path

    @classmethod
    def check(cls, path: str | Path, tokenizer: bool = True) -> ModelFiles:
        """A draft model needs no tokenizer of its own (``tokenizer=False``)."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise ValueError(f"model path {str(path)!r} is not a directory")
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {str(path)!r} has no config.json")
        if not list(path.glob("*.safetensors")):
            raise ValueError(f"model directory {str(path)!r} has no *.safetensors weights")
        if tokenizer and not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            raise ValueError(f"model directory {str(path)!r} has no tokenizer (tokenizer.json)")
        return cls(path)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        for file in sorted(self.path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(path))


def eos_token_ids(path: str | Path, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """End-of-sequence ids from the generation config, the model config and the tokenizer."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    try:
        generation_eos = GenerationConfig.from_pretrained(str(path)).eos_token_id
    except OSError:
        generation_eos = None
    config_eos = getattr(AutoConfig.from_pretrained(str(path)), "eos_token_id", None)
    for value in (generation_eos, config_eos):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids


def load_model(
    path: str | Path,
    tp: TensorParallelGroup,
    dtype: torch.dtype,
    device: torch.device,
    max_model_len: int | None,
    plans: PlanSource = KernelPlan.single(WeightLayout.OUTPUT_MAJOR),
) -> tuple[LlamaForCausalLM | EagleDraftModel, int]:
    """Build the model, load this rank's weight shards and store each linear weight as the plan
    for its shape says (``plans``: one ``KernelPlan`` for all, or a plan per shape); returns
    (model, effective max_model_len)."""
    files = ModelFiles.check(path, tokenizer=False)
    hf_config = AutoConfig.from_pretrained(str(files.path))
    arch = ModelArchitecture.from_hf_config(hf_config)
    model_class = EagleDraftModel if EAGLE_ARCHITECTURE in (hf_config.architectures or []) else LlamaForCausalLM
    limit = arch.max_position_embeddings
    if max_model_len is not None and max_model_len > limit:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's limit of {limit}")
    max_len = max_model_len or min(limit, DEFAULT_MAX_MODEL_LEN)
    with torch.device(device):
        model = model_class(arch, tp, max_len)
    model.load_weights(files.weights())
    model = model.to(dtype=dtype).eval()
    apply_kernel_plan(model, plans)
    return model, max_len
