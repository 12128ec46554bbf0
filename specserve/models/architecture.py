"""What the Llama-family forward needs to know about a checkpoint, read from its HF config."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "EagleLlamaDraft": "llama",  # a draft head over a Llama target's features (models/eagle.py)
}


@dataclass(frozen=True)
class ModelArchitecture:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    max_position_embeddings: int
    inv_freq: torch.Tensor
    rope_attention_scaling: float

    @classmethod
    def from_hf_config(cls, config: PretrainedConfig) -> ModelArchitecture:
        architectures = getattr(config, "architectures", None) or []
        family = next((SUPPORTED_ARCHITECTURES[a] for a in architectures
                       if a in SUPPORTED_ARCHITECTURES), None)
        if family is None:
            raise ValueError(
                f"unsupported architecture {architectures or config.model_type!r}; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r} (need 'silu')")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq, scaling = _rope_frequencies(config, head_dim)
        attention_bias = getattr(config, "attention_bias", False)
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or attention_bias,
            o_bias=family != "qwen2" and attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            max_position_embeddings=_max_positions(config),
            inv_freq=inv_freq,
            rope_attention_scaling=scaling,
        )


def _max_positions(config: PretrainedConfig) -> int:
    limit = config.max_position_embeddings
    # Without a sliding window in the kernel we stay exact by never exceeding the window.
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        limit = min(limit, window)
    return limit


def _rope_parameters(config: PretrainedConfig) -> dict:
    """RoPE settings across transformers versions ('rope_parameters' in v5, 'rope_scaling' before)."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.get("type", "default"))
    params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return params


def _rope_frequencies(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    params = _rope_parameters(config)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}")
    # 'dynamic' only departs from its base frequencies past max_position_embeddings, which the
    # engine never exceeds, so its initial frequencies are exact here.
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)
