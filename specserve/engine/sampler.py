"""From logits to next tokens: logit bias, penalties and structured-output constraints, greedy,
temperature, top-k, top-p, per-request seeds.

``adjusted`` and ``target_probs`` define the distribution a request samples from; speculative
verification uses the same functions so that accepting drafted tokens stays lossless.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from specserve.engine.sampling_params import SamplingParams


class TokenCounts:
    """What penalties read of a request's tokens, as [V] tensors: how often it generated each
    token, and which tokens its prompt or output holds."""

    def __init__(self, generated: torch.Tensor, seen: torch.Tensor) -> None:
        self.generated = generated
        self.seen = seen

    @classmethod
    def of(cls, prompt: Sequence[int], generated: Sequence[int], vocab: int, device: torch.device) -> TokenCounts:
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long, device=device), minlength=vocab)
        seen = counts > 0
        seen[torch.tensor(prompt, dtype=torch.long, device=device)] = True
        return cls(counts, seen)

    def plus(self, tokens: Sequence[int]) -> TokenCounts:
        """The counts once ``tokens`` were generated too."""
        if not tokens:
            return self
        ids = torch.tensor(tokens, dtype=torch.long, device=self.generated.device)
        seen = self.seen.clone()
        seen[ids] = True
        return TokenCounts(self.generated.index_add(0, ids, torch.ones_like(ids)), seen)


def adjusted(
    logits: torch.Tensor,
    params: list[SamplingParams],
    counts: Callable[[int], TokenCounts],
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``logits`` [B, V] as each row's request chooses from them: its repetition penalty on the
    tokens ``counts(row)`` has seen (prompt and generated), its presence and frequency penalties
    on the generated ones, its ``logit_bias``, then -inf where ``allowed`` [B, V] (its
    structured-output constraint) refuses the token. What plain sampling and speculative
    verification both choose from; a copy, made only where a row needs one."""
    rows = [row for row, p in enumerate(params) if p.adjusts_logits]
    if not rows:
        return logits
    logits = logits.clone()
    for row in rows:
        p = params[row]
        if p.penalized:
            tokens = counts(row)
            if p.repetition_penalty != 1.0:  # vLLM's (CTRL's): shrink the logits of every token seen
                values = logits[row]
                shrunk = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
                logits[row] = torch.where(tokens.seen, shrunk, values)
            if p.presence_penalty or p.frequency_penalty:
                logits[row] -= p.frequency_penalty * tokens.generated + p.presence_penalty * (tokens.generated > 0)
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits.device)
            logits[row, ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
    if allowed is not None:
        logits.masked_fill_(~allowed.to(logits.device), float("-inf"))
    return logits


def target_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Probabilities [B, V] after temperature, top-k and top-p (rows of greedy requests unused)."""
    temps = torch.tensor(
        [p.temperature if p.temperature > 0 else 1.0 for p in params], device=logits.device
    )
    logits = logits / temps.unsqueeze(1)
    top_ks = [p.top_k for p in params]
    if any(top_ks):
        vocab = logits.shape[-1]
        k = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks], device=logits.device)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_ps = [p.top_p for p in params]
    if any(p < 1.0 for p in top_ps):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        top_p = torch.tensor(top_ps, device=logits.device).unsqueeze(1)
        drop_sorted = mass_before >= top_p  # keeps the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    histories: Sequence[tuple[Sequence[int], Sequence[int]]] = (),
    allowed: torch.Tensor | None = None,
) -> list[int]:
    """One next token per row of ``logits`` [B, V]; ``histories``: each row's request's prompt
    and output so far (needed only by requests with penalties); ``allowed``: the tokens each
    row's constraint allows (needed only by requests with structured output)."""
    vocab, device = logits.shape[-1], logits.device
    logits = adjusted(logits, params, lambda row: TokenCounts.of(*histories[row], vocab, device), allowed)
    greedy = [p.greedy for p in params]
    tokens = logits.argmax(dim=-1).tolist()
    if all(greedy):
        return tokens
    sampled_rows = [i for i, g in enumerate(greedy) if not g]
    probs = target_probs(logits[sampled_rows], [params[i] for i in sampled_rows])
    for i, token in zip(sampled_rows, draw(probs, [generators[i] for i in sampled_rows])):
        tokens[i] = token
    return tokens


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of ``probs`` [B, V] by inverse-CDF sampling, with one uniform number per
    row from that row's generator. (``torch.multinomial`` takes milliseconds per row of a
    49,152-word vocabulary on a CPU; this is one batched cumulative sum and search.)"""
    cdf = probs.double().cumsum(dim=-1)
    uniform = torch.tensor([torch.rand(1, generator=g).item() for g in generators], dtype=torch.float64)
    point = uniform.to(cdf.device).unsqueeze(1) * cdf[:, -1:]
    # right=True: the first token whose cumulative mass exceeds the point, never one of mass 0
    return torch.searchsorted(cdf, point, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1).tolist()


def top_logprobs(logits: torch.Tensor, tokens: list[int], counts: list[int]) -> list[dict[int, float]]:
    """Per row of ``logits``: log-probabilities of the chosen token and of the ``counts[i]`` most
    likely tokens, most likely first."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device).unsqueeze(1)).squeeze(1).tolist()
    k = max(counts)
    # One transfer of the top-k of every row (the logits may be on a GPU).
    top_values, top_ids = (t.tolist() for t in logprobs.topk(k, dim=-1)) if k else ([], [])
    rows = []
    for i, (token, count) in enumerate(zip(tokens, counts)):
        row = dict(zip(top_ids[i][:count], top_values[i][:count])) if count else {}
        row.setdefault(token, chosen[i])
        rows.append(row)
    return rows
