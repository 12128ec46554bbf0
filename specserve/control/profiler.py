"""Measure forward latency on the current hardware: the data behind the cost model."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from specserve.control.cost_model import LatencyTable
from specserve.models.forward_batch import SequenceSlice

Forward = Callable[[list[SequenceSlice]], torch.Tensor]

# Dense below 16 tokens, where a few requests' trees are priced node by node: a CPU forward costs
# about the same for 1 to 6 tokens and then steps up (here 37 ms, then 43 ms at 8 tokens), which a
# straight line from 4 to 16 tokens turns into a price on every node past the fourth.
FULL_TOKENS = (1, 2, 4, 6, 8, 12, 16, 32, 64, 128, 256, 512)
QUICK_TOKENS = (1, 2, 4, 6, 8, 12, 16, 64, 256)
FULL_CONTEXTS = (64, 512, 1536)
QUICK_CONTEXTS = (128, 1024)


def step_slices(tokens: int, context: int, num_slots: int) -> list[SequenceSlice]:
    """A step of ``tokens`` new tokens spread over as many sequences as there are slots (at most
    one per token), each behind ``context`` cached positions; logits of every sequence's last."""
    num_seqs = min(tokens, num_slots)
    slices = []
    for seq in range(num_seqs):
        n = tokens // num_seqs + (seq < tokens % num_seqs)
        slices.append(
            SequenceSlice(
                slot=seq,
                token_ids=[(seq + k) % 97 for k in range(n)],
                positions=list(range(context, context + n)),
                cache_start=context,
                logits_at=[n - 1],
            )
        )
    return slices


def _timed_ms(forward: Forward, slices: list[SequenceSlice]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    forward(slices)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def measure(forward: Forward, slices: list[SequenceSlice], repeats: int) -> float:
    """Median ms of ``repeats`` forwards, after one warm-up."""
    forward(slices)
    return statistics.median(_timed_ms(forward, slices) for _ in range(repeats))


def profile_forward(
    forward: Forward,
    *,
    num_slots: int,
    max_len: int,
    max_tokens: int,
    quick: bool = False,
    repeats: int = 3,
    label: str = "profile",
) -> LatencyTable:
    """Latency table of ``forward`` over (tokens, context), within the cache's slots and length.

    The grid is measured in ``repeats`` rounds that run every shape once, after a warm-up round,
    and each shape keeps its least time: a neighbour or a drifting clock only ever adds time, and
    interleaving spreads drift over all shapes alike. A forward never costs less for more tokens
    or a longer context, so what is left of the noise is evened out upwards along both.
    """
    tokens = [t for t in (QUICK_TOKENS if quick else FULL_TOKENS) if t <= max_tokens] or [max_tokens]
    widest = -(-tokens[-1] // num_slots)  # tokens per sequence in the biggest step
    contexts = sorted({min(c, max_len - widest) for c in (QUICK_CONTEXTS if quick else FULL_CONTEXTS)})
    shapes = {(c, t): step_slices(t, c, num_slots) for c in contexts for t in tokens}
    for slices in shapes.values():
        forward(slices)
    least = dict.fromkeys(shapes, float("inf"))
    with tqdm(total=repeats * len(shapes), desc=label, unit="shape", leave=False) as progress:
        for _ in range(repeats):
            for shape, slices in shapes.items():
                least[shape] = min(least[shape], _timed_ms(forward, slices))
                progress.update()
    ms = np.array([[least[c, t] for t in tokens] for c in contexts])
    ms = np.maximum.accumulate(np.maximum.accumulate(ms, axis=1), axis=0)
    return LatencyTable(tokens=tokens, contexts=contexts, ms=ms.tolist())
