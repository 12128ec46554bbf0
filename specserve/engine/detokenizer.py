"""Incremental detokenization and stop-string handling for one request."""

from __future__ import annotations

from collections.abc import Callable

from tokenizers import Tokenizer, decoders
from transformers import PreTrainedTokenizerBase

# Decoding a few tokens before the new ones keeps word-boundary spaces right for
# SentencePiece/BPE tokenizers without re-decoding the whole output every step.
_CONTEXT_TOKENS = 6


def _decode_stream_from_ids() -> type | None:
    """tokenizers' ``DecodeStream`` where it can continue from given ids (tokenizers >= 0.22;
    machines with an older one, pinned by their transformers, decode through transformers)."""
    stream = getattr(decoders, "DecodeStream", None)
    try:
        stream([1], skip_special_tokens=True)
    except TypeError:
        return None
    return stream


DecodeStream = _decode_stream_from_ids()


class RustTextStream:
    """The text each new token completes, from the Rust tokenizer's ``DecodeStream``: one call
    per token, which holds back incomplete characters itself."""

    def __init__(self, backend: Tokenizer, context_ids: list[int]) -> None:
        self._backend = backend
        self._stream = DecodeStream(context_ids, skip_special_tokens=True)

    def __call__(self, token_id: int) -> str:
        try:
            return self._stream.step(self._backend, token_id) or ""
        except Exception:  # its buffered prefix stopped decoding (invalid UTF-8, vllm#17448): start afresh
            self._stream = DecodeStream(skip_special_tokens=True)
            return self._stream.step(self._backend, token_id) or ""


class DecodingTextStream:
    """The text each new token completes, by decoding the tokens since the last complete text
    twice (without and with the new ones) through ``tokenizer.decode``: for tokenizers without
    a Rust backend, or whose text transformers cleans up after decoding."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, context_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self.token_ids = list(context_ids)
        self.prefix_offset = 0  # tokens before this one only give context
        self.read_offset = len(self.token_ids)  # text of tokens before this one is emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def __call__(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):  # a character is still incomplete
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return full[len(prefix) :]


def text_stream(tokenizer: PreTrainedTokenizerBase, context_ids: list[int]) -> Callable[[int], str]:
    """A function from each next token id to the text it completes (empty while a character is
    incomplete), after ``context_ids``: Rust's ``DecodeStream`` when transformers would not
    change the text it decodes (no clean-up of spaces) and tokenizers has it, else
    ``tokenizer.decode``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.clean_up_tokenization_spaces or DecodeStream is None:
        return DecodingTextStream(tokenizer, context_ids)
    return RustTextStream(backend, context_ids)


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
        self._next_text = text_stream(tokenizer, prompt_ids[-_CONTEXT_TOKENS:])
        self.stop = stop
        self.include_stop = include_stop
        self.text = ""  # decoded output so far (may include held-back text)
        self.emitted = 0  # characters of ``text`` already returned to the caller
        self.stopped_by: str | None = None

    def add(self, token_id: int) -> None:
        self.text += self._next_text(token_id)
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
