"""Tiny random-weight models saved as real HF directories (config, safetensors, tokenizer)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Speculative decoding drafts tokens that the target model verifies.",
    "def add(a, b):\n    return a + b\n",
    "Hello world! How are you today? I am fine, thank you.",
    "Serving large language models under latency objectives is hard.",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PROMPTS = [
    "The quick brown fox",
    "def add(a, b):",
    "Hello world! How are",
    "Serving large language models under latency objectives is hard because",
    "Speculative",
]


def _tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>", unk_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(path: Path, seed: int = 0, **overrides) -> Path:
    """Save a random-weight causal LM (Llama architecture unless overridden) with a tokenizer."""
    from transformers import AutoConfig

    tokenizer = _tokenizer(vocab_size=384)
    options = dict(
        model_type="llama",
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    options.update(overrides)
    model_type = options.pop("model_type")
    config = AutoConfig.for_model(model_type, **options)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():  # larger weights than the default init give peakier, less tie-prone logits
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path




def build_tiny_eagle(path: Path, target: Path, seed: int = 0, known_tokens: int = 300, repeat: bool = False) -> Path:
    """Save a random-weight EAGLE head for ``target`` whose vocabulary is the target's first
    ``known_tokens`` ids (the rest map to its unknown row). ``repeat``: a head that passes the
    input feature through unchanged (``fc`` = [0 | I], zero output projections) over the
    target's own embedding, so it proposes the token the target just chose, again and again."""
    from safetensors.torch import load_file

    from specserve.distill.eagle import EagleHead, head_config, save_head

    torch.manual_seed(seed)
    head = EagleHead(head_config(target, known_tokens + 1))
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
        if repeat:
            hidden = head.config.hidden_size
            embed = load_file(target / "model.safetensors")["model.embed_tokens.weight"]
            head.embed_tokens.weight.copy_(torch.cat([embed[:known_tokens], embed[known_tokens:].mean(0, keepdim=True)]))
            head.fc.weight.zero_()
            head.fc.weight[:, hidden:] = torch.eye(hidden)
            for layer in head.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    save_head(head, list(range(known_tokens)), path, {"test": True})
    return path
