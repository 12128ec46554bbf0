"""Outside documents for distillation: passages of real text the target summarizes and answers about.

Target-written documents (``prompts.document_requests``) teach the draft the target's own prose;
real articles, speeches and e-mails, as users paste them, are the contexts a served model reads.
A corpus is a JSON Lines file with a ``"text"`` field per line (other fields are ignored); long
texts are cut into passages of whole sentences, so that a prompt fits the target's context.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

PASSAGE_CHARS = 1500
MIN_PASSAGE_CHARS = 300
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


class CorpusError(ValueError):
    """The documents file cannot be read as a corpus."""


def read_passages(path: Path, max_chars: int = PASSAGE_CHARS, min_chars: int = MIN_PASSAGE_CHARS) -> list[str]:
    """Every passage of every document in ``path``, in file order; passages outside
    ``min_chars``..``2 * max_chars`` (a heading, a table without sentence ends) are left out."""
    passages: list[str] = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CorpusError(f'{path}:{number}: expected a JSON object with a "text" field') from e
            if not isinstance(text, str):
                raise CorpusError(f'{path}:{number}: "text" must be a string')
            passages += [p for p in split_passages(text, max_chars) if min_chars <= len(p) <= 2 * max_chars]
    if not passages:
        raise CorpusError(f"{path}: no passage of at least {min_chars} characters")
    return passages


def split_passages(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into passages of at most ``max_chars``, at sentence ends, keeping paragraph
    breaks; a single sentence longer than ``max_chars`` is its own passage."""
    passages: list[str] = []
    current = ""
    for paragraph in _PARAGRAPH_BREAK.split(text.strip()):
        separator = "\n\n"
        for sentence in _SENTENCE_END.split(paragraph.strip()):
            if current and len(current) + len(separator) + len(sentence) > max_chars:
                passages.append(current)
                current = ""
            current = f"{current}{separator}{sentence}" if current else sentence
            separator = " "
    if current:
        passages.append(current)
    return passages
