"""Structured output: keep a request's tokens within a JSON schema, regex, choice or grammar.

llguidance compiles the constraint for the model's tokenizer and tells, in any state, which
tokens may come next. The engine asks for the tokens allowed after a request's output so far
and, when it speculates, after the path to every node of its token tree; the sampler refuses
the others wherever a token is chosen, in plain decoding and in verification alike, so
speculation stays lossless under a constraint. Where the constraint forces the next tokens (a
JSON key, punctuation), the engine drafts them itself: the target accepts them for sure.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from specserve.engine.sampling_params import StructuredOutput


class Grammars:
    """Compiles constraints for one tokenizer."""

    def __init__(self, tokenizer) -> None:
        self._hf_tokenizer = tokenizer
        self._tokenizer: llguidance.LLTokenizer | None = None  # built on first use (~0.5 s)

    def constraint(self, spec: StructuredOutput) -> TokenConstraint:
        """A fresh constraint state; ValueError naming what is wrong with an invalid one."""
        if self._tokenizer is None:
            self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer)
        grammar = checked_grammar(spec, self._tokenizer)
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured output: {matcher.get_error()}")
        return TokenConstraint(matcher, self._tokenizer.vocab_size)


def checked_grammar(spec: StructuredOutput, tokenizer: llguidance.LLTokenizer | None = None) -> str:
    """The llguidance grammar of a constraint; ValueError saying what is wrong with an invalid
    one (checked against ``tokenizer`` if given, else only as a grammar)."""
    try:
        grammar = _grammar(spec)
    except ValueError as exc:
        raise ValueError(f"structured output: {exc}") from None
    if error := llguidance.LLMatcher.validate_grammar(grammar, tokenizer):
        raise ValueError(f"structured output: {error.strip()}")
    return grammar


def _grammar(spec: StructuredOutput) -> str:
    from_schema = llguidance.LLMatcher.grammar_from_json_schema
    if spec.json_schema is not None:
        return from_schema(spec.json_schema)
    if spec.json_object:
        return from_schema({"type": "object"})
    if spec.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        return llguidance.LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in spec.choice))
    return llguidance.LLMatcher.grammar_from_lark(spec.grammar)


class TokenConstraint:
    """One request's constraint, in the state its output so far left it in."""

    def __init__(self, matcher: llguidance.LLMatcher, tokenizer_vocab: int) -> None:
        self._matcher = matcher
        self._tokenizer_vocab = tokenizer_vocab

    def allowed(self, paths: Sequence[Sequence[int]], vocab: int) -> torch.Tensor:
        """[len(paths), vocab] bool: the tokens that may follow the output so far plus each
        path. A path the constraint refuses allows everything: its row is never used, as the
        token leading to it is refused one row up."""
        bitmask = llguidance.torch.allocate_token_bitmask(len(paths), self._tokenizer_vocab)
        for row, path in enumerate(paths):
            with self._after(path) as allowed_path:
                if allowed_path:
                    llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)
        bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
        allowed = bits.flatten(1).bool()[:, :vocab]
        if allowed.shape[1] < vocab:  # ids the tokenizer does not know are never allowed
            allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
        return allowed

    def accepts(self, paths: Sequence[Sequence[int]]) -> list[bool]:
        """Whether the constraint allows each whole path after the output so far."""
        verdicts = []
        for path in paths:
            with self._after(path) as allowed_path:
                verdicts.append(allowed_path)
        return verdicts

    @contextmanager
    def _after(self, path: Sequence[int]) -> Iterator[bool]:
        """The matcher moved past as much of ``path`` as it allows, and whether that was all of it;
        back where it was afterwards."""
        consumed = self._matcher.try_consume_tokens(list(path)) if path else 0
        try:
            yield consumed == len(path)
        finally:
            if consumed:
                self._matcher.rollback(consumed)

    def forced(self) -> list[int]:
        """The tokens the constraint allows next, each the only one allowed after the ones
        before it (none once the output is complete)."""
        return [] if self._matcher.is_stopped() else self._matcher.compute_ff_tokens()

    def accept(self, token: int) -> None:
        """Advance past an emitted token."""
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"structured output refused token {token}: {self._matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """Whether the output is complete: the constraint allows no further token."""
        return self._matcher.is_stopped()
