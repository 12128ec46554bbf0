"""Incremental detokenization and stop-string handling for one request."""

from __future__ import annotations

import functools
from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

# Decoding a few tokens before the new ones keeps word-boundary spaces right for
# SentencePiece/BPE tokenizers without re-decoding the whole output every step.
_CONTEXT_TOKENS = 6


def text_decoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[int]], str]:
    """``tokenizer.decode(ids, skip_special_tokens=True)``, as a direct call into the Rust
    tokenizer when transformers would not change its text (no clean-up of spaces): its Python
    layers take more than half of each call, and every step decodes twice per request."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.clean_up_tokenization_spaces:
        return functools.partial(tokenizer.decode, skip_special_tokens=True)
    return functools.partial(backend.decode, skip_special_tokens=True)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text, emitting only complete characters.

    Text that could still turn out to be the beginning of a stop string is held back, so
    streamed text never contains (part of) a stop string that is cut off later.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: list[int],
        stop: list[str],
        include_stop: bool,
    ) -> None:
        self._decode = text_decoder(tokenizer)
        self.token_ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0  # tokens before this one only give context
        self.read_offset = len(self.token_ids)  # text of tokens before this one is emitted
        self.stop = stop
        self.include_stop = include_stop
        self.text = ""  # decoded output so far (may include held-back text)
        self.emitted = 0  # characters of ``text`` already returned to the caller
        self.stopped_by: str | None = None

    def add(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.token_ids)
        self._check_stop()

    def _check_stop(self) -> None:
        if self.stopped_by or not self.stop:
            return
        # Only the newly decoded tail (plus a stop string's length of context) can match.
        window_start = max(0, self.emitted - max(len(s) for s in self.stop))
        hits = [(self.text.find(s, window_start), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            index, stop = min(hits)
            self.stopped_by = stop
            self.text = self.text[: index + len(stop) if self.include_stop else index]

    def take_new_text(self, finished: bool) -> str:
        """Text not yet returned; while running, holds back a possible stop-string prefix."""
        end = len(self.text)
        if not finished and self.stop:
            end = min(end, len(self.text) - self._stop_prefix_len())
        new = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return new

    def _stop_prefix_len(self) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:n]):
                    best = n
                    break
        return best
