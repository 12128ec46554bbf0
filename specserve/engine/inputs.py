"""Prompts to validated token ids: what a front end needs of a model, without its weights.

The engine validates every request with it, and so does a front end whose engine runs in
another process (``engine_process.py``), which must turn bad input into a clear error before
the request leaves it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jinja2

from specserve.config import EngineConfig
from specserve.engine.sampling_params import SamplingParams
from specserve.models.loader import eos_token_ids, load_tokenizer

Prompt = str | Sequence[int]


class InputProcessor:
    """The tokenizer, chat template and limits of one served model."""

    def __init__(self, config: EngineConfig, model_path: Path, vocab_size: int, max_model_len: int) -> None:
        self.config = config
        self.model_path = model_path
        self.tokenizer = load_tokenizer(model_path)
        self.eos_token_ids = eos_token_ids(model_path, self.tokenizer)
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def prompt_ids(self, prompt: Prompt, params: SamplingParams) -> list[int]:
        """The prompt's token ids, checked with ``params`` against the model's vocabulary and
        context; raises ValueError with a clear message on bad input."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            token_ids = self.encode(prompt, "prompt")
        else:
            token_ids = [int(t) for t in prompt]
            bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside [0, {self.vocab_size})")
        if not token_ids:
            raise ValueError("prompt must not be empty")
        if bad := [t for t in params.logit_bias if t >= self.vocab_size]:
            raise ValueError(f"logit_bias token ids {bad[:5]} are outside [0, {self.vocab_size})")
        if len(token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(token_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"the model context of {self.max_model_len} tokens"
            )
        return token_ids

    def apply_chat_template(self, messages: list[dict[str, str]], tools: list[dict] | None = None) -> list[int]:
        """Prompt token ids of a conversation (the template supplies the special tokens, and
        shows the ``tools`` if it knows how)."""
        if not self.tokenizer.chat_template:
            raise ValueError("this model has no chat template")
        if not messages:
            raise ValueError("messages must not be empty")
        try:
            text = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        except jinja2.TemplateError as exc:  # e.g. the template's own raise_exception on a role order
            raise ValueError(f"the chat template refused the messages: {exc}") from None
        return self.encode(text, "messages", add_special_tokens=False)

    def encode(self, text: str, what: str = "prompt", add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; text that is not Unicode (a lone surrogate, which JSON's
        ``"\\ud800"`` decodes to) is a ValueError naming ``what``, not a tokenizer's TypeError."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"{what} is not valid Unicode text: {exc.reason}") from None
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
