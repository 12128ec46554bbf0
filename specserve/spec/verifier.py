"""Lossless verification of a token tree against the target's logits at (root, nodes...).

Walks down from the root. At each node the target picks the next token exactly as plain decoding
would (argmax when greedy, a sample of the request's distribution otherwise); if a child carries
that token the walk moves to it, otherwise the picked token is the bonus token and the walk ends.

For sampling this is SpecInfer's multi-draft speculative sampling with deterministic drafts: the
drafter proposes its children as fixed candidates (point masses q_i = delta(x_i)), for which the
rejection rule ``accept x_i with min(1, p'(x_i) / q_i(x_i))`` followed by the residual
``p' <- norm(max(p' - q_i, 0))`` is the same as drawing one token from p and checking whether it
is among the children. On a chain it is Leviathan et al.'s rejection sampling with a greedy
drafter. Every emitted token is therefore a sample of the target's distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specserve.engine.sampler import TokenCounts, adjusted, draw, target_probs
from specserve.engine.sampling_params import SamplingParams
from specserve.engine.structured import TokenConstraint
from specserve.spec.tree import TokenTree


@dataclass
class Verdict:
    accepted: list[int]  # node indices of the accepted path, root's child first
    tokens: list[int]  # tokens to emit: the accepted nodes' tokens, then the bonus token
    row_of_token: list[int]  # logits row (0 = root) each emitted token was picked from


def verify(
    tree: TokenTree,
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    prompt: Sequence[int] = (),
    generated: Sequence[int] = (),
    constraint: TokenConstraint | None = None,
) -> Verdict:
    """``logits`` [len(tree)+1, V]: row 0 for the root, row i+1 for node i. ``prompt`` and
    ``generated`` (the output so far, root included) are what penalties count, and
    ``constraint`` (in the state ``generated`` left it) what structured output allows; a node's
    row also counts the nodes on its path, as plain decoding would have generated them."""
    if params.adjusts_logits:
        vocab = logits.shape[-1]
        # What each row's request generated beyond the root: only penalties and constraints read it.
        reads_paths = params.penalized or constraint is not None
        paths = [[], *tree.token_paths()] if reads_paths else []  # row 0 is the root
        base = TokenCounts.of(prompt, generated, vocab, logits.device) if params.penalized else None
        allowed = constraint.allowed(paths, vocab) if constraint is not None else None
        logits = adjusted(logits, [params] * logits.shape[0], lambda row: base.plus(paths[row]), allowed)
    if params.greedy:
        choices = logits.argmax(dim=-1).tolist()

        def pick(row: int) -> int:
            return choices[row]
    else:
        probs = target_probs(logits, [params] * logits.shape[0])

        def pick(row: int) -> int:
            return draw(probs[row : row + 1], [generator])[0]

    accepted: list[int] = []
    rows: list[int] = []
    node = -1
    while True:
        row = node + 1
        token = pick(row)
        rows.append(row)
        child = tree.children(node).get(token)
        if child is None:
            return Verdict(accepted, [tree.tokens[i] for i in accepted] + [token], rows)
        accepted.append(child)
        node = child
