"""Typed engine configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from specserve.control.policies import PolicyName
from specserve.control.slo import SLOConfig
from specserve.models.kv_cache import DEFAULT_MAX_MODEL_LEN
from specserve.models.linear_kernel import int8_available
from specserve.spec.tree import TreeBudget

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _existing_dir(value: str | None, what: str) -> str | None:
    if value is not None and not Path(value).expanduser().is_dir():
        raise ValueError(f"{what} path {value!r} is not a directory")
    return value


class SpeculativeConfig(BaseModel):
    """Speculative decoding: which drafter, and the tree budget of requests that set none."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["draft", "ngram", "hybrid"] = Field(
        default="draft",
        description="'draft': a small draft model; 'ngram': prompt lookup; 'hybrid': both, their "
        "trees merged (lookups weighted by how often they were right for the request).",
    )
    draft_model: str | None = Field(
        default=None,
        description="Local HF directory of the draft model; None means the project's distilled "
        "draft (made for the default target; usable with any target sharing its tokenizer).",
    )
    budget: TreeBudget = Field(
        default_factory=TreeBudget,
        description="The largest tree a request drafts; adaptive policies choose within it.",
    )
    draft_placement: Literal["colocated", "actor"] = Field(
        default="colocated",
        description="'colocated': the draft model runs in the engine's process; 'actor': on its "
        "own Ray actor (another process, node or GPU; needs a running Ray), restarted if it dies.",
    )
    draft_dtype: Literal["auto", "float32", "float16", "bfloat16", "int8"] = Field(
        default="auto",
        description="The draft model's dtype. 'int8' (CPU only): int8 weights, one scale per "
        "output channel, float32 activations quantized per matmul (fbgemm); a draft step streams "
        "a quarter of float32's bytes. 'auto': int8 on a CPU, else the engine's. It changes which "
        "tokens are drafted, never the output.",
    )
    draft_num_cpus: float = Field(default=1.0, ge=0, description="CPUs of the draft actor.")
    draft_num_gpus: float = Field(default=0.0, ge=0, description="GPUs of the draft actor.")
    ngram_min: int = Field(default=2, ge=1)
    ngram_max: int = Field(default=4, ge=1)

    @field_validator("draft_model")
    @classmethod
    def _draft_dir_exists(cls, value: str | None) -> str | None:
        return _existing_dir(value, "draft model")


class ControlConfig(BaseModel):
    """The SLO controller: speculation policy, cost profile and SLO classes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: PolicyName = Field(
        default="auto",
        description="How much to speculate, per request and iteration (when speculative decoding "
        "is configured): none, fixed, smartspec, specserve, adaserve or auto.",
    )
    profile: str | None = Field(
        default=None,
        description="Saved cost profile (JSON from `specserve profile`); None: this model's cached "
        "profile for the device and TP size, measured at start-up when there is none.",
    )
    slo: SLOConfig = Field(default_factory=SLOConfig)

    @field_validator("profile")
    @classmethod
    def _profile_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().is_file():
            raise ValueError(f"profile {value!r} is not a file")
        return value


class EngineConfig(BaseModel):
    """Everything an engine needs to load a model and size its batches and KV cache."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(
        default=None,
        description="Local Hugging Face model directory; None means the embedded default "
        "(SmolLM2-135M-Instruct).",
    )
    device: str = Field(default="auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="'auto' is float32 on CPU and bfloat16 on CUDA."
    )
    tensor_parallel_size: int = Field(default=1, ge=1)
    worker_backend: Literal["process", "ray"] = Field(
        default="process",
        description="How TP ranks 1..N-1 run: local processes, or Ray actors in a STRICT_PACK "
        "placement group (the Serve replica's own when it has one; needs a running Ray).",
    )
    collective_timeout_s: float = Field(
        default=60.0, gt=0,
        description="Longest rank 0 waits in one tensor-parallel collective before the step fails "
        "(a worker that died without closing its connection); the workers wait for rank 0's next "
        "call without a limit, however long the replica idles.",
    )
    weight_layout: Literal["auto", "output_major", "input_major", "onednn_packed"] = Field(
        default="auto",
        description="How linear weights are stored: 'auto' measures which layout multiplies "
        "fastest on this CPU for one row, two and more, and whether one row runs faster as two "
        "(once per weight shape, cached; a copy is kept per layout the plan uses); CUDA uses output_major. 'onednn_packed' (CPU builds with oneDNN) "
        "keeps oneDNN's prepacked blocked layout.",
    )
    enforce_eager: bool = Field(
        default=False,
        description="Run every step eagerly. Otherwise a CUDA device (tensor_parallel_size 1) "
        "replays a CUDA graph, captured on first use, for each small step shape.",
    )
    cuda_graph_max_tokens: int = Field(
        default=512, ge=1, description="Largest padded step (rows x tokens per row) run as a CUDA graph."
    )
    max_num_seqs: int = Field(
        default=32, ge=1, description="KV cache capacity in sequences (one slot each)."
    )
    max_model_len: int | None = Field(
        default=None,
        ge=16,
        description="Tokens per KV slot (prompt + output). None: the model's limit, at most "
        f"{DEFAULT_MAX_MODEL_LEN} (every slot reserves this many positions).",
    )
    max_num_batched_tokens: int = Field(
        default=512, ge=16, description="Token budget of one forward step (chunked prefill)."
    )
    seed: int = Field(default=0, description="Seed for requests that do not carry their own.")
    speculative: SpeculativeConfig | None = Field(
        default=None, description="Speculative decoding; None decodes one token per step."
    )
    control: ControlConfig = Field(default_factory=ControlConfig)

    @field_validator("model")
    @classmethod
    def _model_dir_exists(cls, value: str | None) -> str | None:
        return _existing_dir(value, "model")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value != "auto" and not (value == "cpu" or value.startswith("cuda")):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {value!r}")
        return value

    @property
    def uses_ray(self) -> bool:
        """Whether the engine starts Ray actors: a draft actor, or tensor-parallel ranks."""
        draft_actor = self.speculative is not None and self.speculative.draft_placement == "actor"
        return draft_actor or (self.tensor_parallel_size > 1 and self.worker_backend == "ray")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if self.torch_device().type == "cpu" else torch.bfloat16
        return DTYPES[self.dtype]

    def draft_dtype(self) -> str:
        """The dtype the draft model runs in (``SpeculativeConfig.draft_dtype`` resolved)."""
        chosen = self.speculative.draft_dtype if self.speculative is not None else "auto"
        device = self.torch_device().type
        if chosen == "int8" and not int8_available(device):
            raise ValueError(f"draft_dtype 'int8' needs a CPU with PyTorch's fbgemm kernels, not {device}")
        if chosen != "auto":
            return chosen
        return "int8" if int8_available(device) else self.dtype
