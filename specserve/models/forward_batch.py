"""The forward interface: which new tokens of which sequences go into one target/draft step.

Every sequence owns one KV-cache slot. A step feeds each sequence some new tokens at explicit
RoPE positions; their K/V are written to the slot at ``cache_start + i``. Each new token sees the
whole cached prefix ``[0, cache_start)`` plus the new tokens its mask allows: causal by default
(prefill, chunked prefill, decode), or an explicit tree mask for speculative verification.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Sequences with at most this many new tokens share one padded attention call; longer ones
# (prompt prefills) get a call of their own so that padding never multiplies their cost.
MAX_PADDED_QUERY = 64


@dataclass
class SequenceSlice:
    """The new tokens of one sequence in one step."""

    slot: int
    token_ids: list[int]
    positions: list[int]
    cache_start: int
    # [n, cache_start + n - tree_start] bool, True: new token i sees cache position tree_start + j.
    # Positions before tree_start are always visible; None means causal.
    tree_mask: torch.Tensor | None = None
    logits_at: list[int] = field(default_factory=list)  # indices into token_ids
    tree_start: int | None = None  # where the masked region starts; None: at cache_start

    def __post_init__(self) -> None:
        if len(self.positions) != len(self.token_ids):
            raise ValueError("positions and token_ids differ in length")
        if self.tree_mask is not None:
            span = self.cache_start + len(self.token_ids) - self.mask_start
            if tuple(self.tree_mask.shape) != (len(self.token_ids), span):
                raise ValueError(f"tree_mask must be [{len(self.token_ids)}, {span}]")

    @property
    def mask_start(self) -> int:
        return self.cache_start if self.tree_start is None else self.tree_start


@dataclass
class AttentionGroup:
    """Sequences whose attention runs as one padded SDPA call over the slot range [lo, lo+rows)."""

    slot_lo: int
    rows: int
    query_len: int
    key_len: int
    token_index: torch.Tensor  # flat positions of the group's tokens in the step
    row_index: torch.Tensor  # their rows in the padded [rows * query_len] query
    mask: torch.Tensor  # [rows, 1, heads_per_kv * query_len, key_len] additive (0 / -inf)
    direct: bool  # padded rows are exactly the step's tokens in order: no scatter/gather


@dataclass
class StepInputs:
    """Device tensors of one step, built once and read by every layer."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    cache_slots: torch.Tensor  # [T] slot of each token
    cache_positions: torch.Tensor  # [T] index of each token's K/V inside its slot
    groups: list[AttentionGroup]
    logits_index: torch.Tensor  # [K] flat positions whose logits are returned
    kv_write_index: torch.Tensor | None = None  # filled by the KV cache on first use


def _group_mask(seqs: list[SequenceSlice], slot_lo: int, rows: int, query_len: int,
                key_len: int, heads_per_kv: int) -> torch.Tensor:
    starts = torch.zeros(rows, dtype=torch.long)
    lengths = torch.zeros(rows, dtype=torch.long)
    for seq in seqs:
        starts[seq.slot - slot_lo] = seq.cache_start
        lengths[seq.slot - slot_lo] = len(seq.token_ids)
    query = torch.arange(query_len)
    key = torch.arange(key_len)
    # Causal over prefix + new tokens: key j is visible to query i iff j <= cache_start + i.
    mask = key[None, None, :] <= (starts[:, None] + query[None, :])[:, :, None]
    mask &= (query[None, :] < lengths[:, None])[:, :, None]
    for seq in seqs:
        if seq.tree_mask is not None:
            n, row = len(seq.token_ids), seq.slot - slot_lo
            mask[row, :n, seq.mask_start : seq.cache_start + n] = seq.tree_mask
    # Padding rows would see nothing and make SDPA return NaN; let them see key 0 instead.
    mask[..., 0] |= ~mask.any(-1)
    return (
        mask.unsqueeze(1)
        .expand(rows, heads_per_kv, query_len, key_len)
        .reshape(rows, 1, heads_per_kv * query_len, key_len)
    )


def build_step_inputs(
    seqs: list[SequenceSlice], heads_per_kv: int, dtype: torch.dtype, device: torch.device
) -> StepInputs:
    """Flatten a batch of sequence slices into the tensors the model consumes."""
    input_ids, positions, slots, cache_pos, logits_index = [], [], [], [], []
    offsets = []
    for seq in seqs:
        offsets.append(len(input_ids))
        n = len(seq.token_ids)
        logits_index.extend(len(input_ids) + i for i in seq.logits_at)
        input_ids.extend(seq.token_ids)
        positions.extend(seq.positions)
        slots.extend([seq.slot] * n)
        cache_pos.extend(range(seq.cache_start, seq.cache_start + n))

    padded = [i for i, s in enumerate(seqs) if len(s.token_ids) <= MAX_PADDED_QUERY]
    alone = [[i] for i, s in enumerate(seqs) if len(s.token_ids) > MAX_PADDED_QUERY]
    groups = []
    for members in ([padded] if padded else []) + alone:
        group_seqs = [seqs[i] for i in members]
        slot_lo = min(s.slot for s in group_seqs)
        rows = max(s.slot for s in group_seqs) - slot_lo + 1
        query_len = max(len(s.token_ids) for s in group_seqs)
        key_len = max(s.cache_start + len(s.token_ids) for s in group_seqs)
        token_index, row_index = [], []
        for i in members:
            seq = seqs[i]
            n = len(seq.token_ids)
            token_index.extend(range(offsets[i], offsets[i] + n))
            base = (seq.slot - slot_lo) * query_len
            row_index.extend(range(base, base + n))
        visible = _group_mask(group_seqs, slot_lo, rows, query_len, key_len, heads_per_kv)
        mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))
        groups.append(
            AttentionGroup(
                slot_lo=slot_lo,
                rows=rows,
                query_len=query_len,
                key_len=key_len,
                token_index=torch.tensor(token_index, device=device),
                row_index=torch.tensor(row_index, device=device),
                mask=mask.to(device),
                direct=rows * query_len == len(input_ids)
                and token_index == row_index == list(range(len(input_ids))),
            )
        )

    def as_tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return StepInputs(
        input_ids=as_tensor(input_ids),
        positions=as_tensor(positions),
        cache_slots=as_tensor(slots),
        cache_positions=as_tensor(cache_pos),
        groups=groups,
        logits_index=as_tensor(logits_index),
    )
