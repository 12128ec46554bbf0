"""Llama-family causal LM (Llama 2/3, SmolLM, Mistral, Qwen2) over a flat batch of new tokens.

Module names mirror Hugging Face's, with q/k/v and gate/up fused into one matmul each, so the
checkpoint maps onto parameters mechanically (see ``load_weights``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from specserve.distributed.parallel_state import TensorParallelGroup
from specserve.models.architecture import ModelArchitecture
from specserve.models.forward_batch import StepInputs
from specserve.models.kv_cache import KVCache
from specserve.models.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    divide,
)

# checkpoint sub-module -> (our fused module, part name inside it)
_FUSED = {
    "q_proj": ("qkv_proj", "q_proj"),
    "k_proj": ("qkv_proj", "k_proj"),
    "v_proj": ("qkv_proj", "v_proj"),
    "gate_proj": ("gate_up_proj", "gate_proj"),
    "up_proj": ("gate_up_proj", "up_proj"),
}


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArchitecture, layer: int, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = divide(arch.num_heads, tp.size, "num_attention_heads")
        self.num_kv_heads = divide(arch.num_kv_heads, tp.size, "num_key_value_heads")
        self.head_dim = arch.head_dim
        self.qkv_proj = MergedColumnParallelLinear(
            arch.hidden_size,
            {
                "q_proj": arch.num_heads * arch.head_dim,
                "k_proj": arch.num_kv_heads * arch.head_dim,
                "v_proj": arch.num_kv_heads * arch.head_dim,
            },
            bias=arch.qkv_bias,
            tp=tp,
        )
        self.o_proj = RowParallelLinear(
            arch.num_heads * arch.head_dim, arch.hidden_size, bias=arch.o_bias, tp=tp
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        step: StepInputs,
    ) -> torch.Tensor:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        qk, v = self.qkv_proj(x).split([q_size + kv_size, kv_size], dim=-1)
        # q and k heads are adjacent in the fused output: rotate them in one go.
        qk = RotaryEmbedding.apply(qk.reshape(-1, self.num_heads + self.num_kv_heads, self.head_dim), cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        return self.o_proj(cache.attend(self.layer, q, k, v, step))


class LlamaMLP(nn.Module):
    def __init__(self, arch: ModelArchitecture, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.intermediate = divide(arch.intermediate_size, tp.size, "intermediate_size")
        self.gate_up_proj = MergedColumnParallelLinear(
            arch.hidden_size,
            {"gate_proj": arch.intermediate_size, "up_proj": arch.intermediate_size},
            bias=arch.mlp_bias,
            tp=tp,
        )
        self.down_proj = RowParallelLinear(
            arch.intermediate_size, arch.hidden_size, bias=arch.mlp_bias, tp=tp
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArchitecture, layer: int, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = LlamaAttention(arch, layer, tp)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = LlamaMLP(arch, tp)

    def forward(self, x, cos, sin, cache, step):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, step)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArchitecture, tp: TensorParallelGroup, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, i, tp) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.rotary = RotaryEmbedding(arch.inv_freq, arch.rope_attention_scaling, max_positions)

    def decode(self, x: torch.Tensor, step: StepInputs, cache: KVCache) -> torch.Tensor:
        """The decoder layers and the final norm over the step's input vectors ``x`` [T, hidden]."""
        cos, sin = self.rotary.table(step.positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, step)
        return self.norm(x)


class LMHeadMixin:
    """What the model runner asks of a model besides ``hidden_states``: GQA grouping and logits."""

    arch: ModelArchitecture
    lm_head: ParallelLMHead

    @property
    def heads_per_kv(self) -> int:
        return self.arch.num_heads // self.arch.num_kv_heads

    def logits(self, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """float32 logits of the rows ``index`` of ``hidden``."""
        return self.lm_head(hidden[index]).float()


class LlamaForCausalLM(LMHeadMixin, nn.Module):
    """Decoder plus LM head: ``hidden_states`` of every new token, ``logits`` of chosen rows."""

    def __init__(self, arch: ModelArchitecture, tp: TensorParallelGroup, max_positions: int) -> None:
        super().__init__()
        self.arch = arch
        self.tp = tp
        self.model = LlamaModel(arch, tp, max_positions)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, tp)

    def hidden_states(
        self, step: StepInputs, cache: KVCache, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final-norm hidden states [T, hidden] of every new token (the features an EAGLE draft
        reads); a Llama model takes no input features."""
        if features is not None:
            raise ValueError("a Llama model takes no input features")
        return self.model.decode(self.model.embed_tokens(step.input_ids), step, cache)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_weights(self, weights, self.arch.tie_word_embeddings)


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], tied: bool) -> None:
    """Copy (this rank's shard of) every checkpoint tensor into the parameter of ``model`` with
    the same name (q/k/v and gate/up into their fused modules)."""
    modules = dict(model.named_modules())
    expected = {
        f"{path}.{name}"
        for path, module in modules.items()
        if hasattr(module, "load")
        for name in _checkpoint_names(module)
    }
    loaded: set[str] = set()
    for name, tensor in _with_tied_head(weights, tied):
        if "rotary_emb" in name:
            continue
        module_path, part = name.rsplit(".", 1)
        parent, leaf = module_path.rsplit(".", 1) if "." in module_path else ("", module_path)
        if leaf in _FUSED:
            fused, sub = _FUSED[leaf]
            module_path, part = f"{parent}.{fused}", f"{sub}.{part}"
        module = modules.get(module_path)
        if module is None or not hasattr(module, "load"):
            raise ValueError(f"checkpoint tensor {name!r} matches no parameter of the model")
        with torch.no_grad():
            module.load(part, tensor)
        loaded.add(f"{module_path}.{part}")
    missing = expected - loaded
    if missing:
        raise ValueError(f"checkpoint lacks weights for: {sorted(missing)[:8]}")


def _with_tied_head(
    weights: Iterable[tuple[str, torch.Tensor]], tied: bool
) -> Iterable[tuple[str, torch.Tensor]]:
    """A tied checkpoint's head is its embedding (a stored ``lm_head.weight`` is ignored)."""
    for name, tensor in weights:
        if tied and name == "lm_head.weight":
            continue
        yield name, tensor
        if tied and name.endswith("embed_tokens.weight"):
            yield "lm_head.weight", tensor


def _checkpoint_names(module: nn.Module) -> list[str]:
    """The names a module expects in ``load``: its parameters, per part for fused linears."""
    names = [name for name, _ in module.named_parameters(recurse=False)]
    if isinstance(module, MergedColumnParallelLinear):
        return [f"{part}.{name}" for part in module.local_sizes for name in names]
    return names
