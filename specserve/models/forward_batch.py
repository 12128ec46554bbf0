"""The forward interface: which new tokens of which sequences go into one target/draft step.

Every sequence owns one KV-cache slot. A step feeds each sequence some new tokens at explicit
RoPE positions; their K/V are written to the slot at ``cache_start + i``. Each new token sees the
whole cached prefix ``[0, cache_start)`` plus the new tokens its mask allows: causal by default
(prefill, chunked prefill, decode), or an explicit tree mask for speculative verification.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

# What a padded attention call costs, in query-key products (see ``attention_groups``), as
# measured on CPU: each row of its slot range reads its keys in about the time ROW_QUERIES
# queries take to attend them, and the call itself, with its scatter and gather, about CALL_COST.
ROW_QUERIES = 5
CALL_COST = 2700


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


def index_tensor(values: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """A long tensor of ``values``, through numpy: three times faster from a Python list than
    ``torch.tensor``, which adds up over the dozen index tensors of every step."""
    return torch.from_numpy(np.fromiter(values, dtype=np.int64, count=len(values))).to(device)


def _group_mask(seqs: list[SequenceSlice], slot_lo: int, rows: int, query_len: int,
                key_len: int, heads_per_kv: int) -> torch.Tensor:
    starts = torch.zeros(rows, dtype=torch.long)
    lengths = torch.zeros(rows, dtype=torch.long)
    row_of = index_tensor([seq.slot - slot_lo for seq in seqs])  # one indexed write, not one per row
    starts[row_of] = index_tensor([seq.cache_start for seq in seqs])
    lengths[row_of] = index_tensor([len(seq.token_ids) for seq in seqs])
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


def _padded_cost(rows: int, query_len: int, key_len: int) -> int:
    return rows * key_len * (ROW_QUERIES + query_len) + CALL_COST


def attention_groups(seqs: list[SequenceSlice]) -> list[list[int]]:
    """The step's sequences (indices) split into padded attention calls.

    A call spans a contiguous slot range and pads every row of it to its longest query and key,
    so one 8-node tree among 15 decodes in one call would make all 16 rows attend 9 queries.
    Sequences are grouped by query length (the cheapest split of the length-sorted order at
    its length changes, by ``_padded_cost``), and a group is cut where the slots it would pad
    between two members cost more than a call of their own.
    """
    if not seqs:
        return []
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].token_ids))
    lengths = [len(seqs[i].token_ids) for i in order]
    cuts = [0] + [k for k in range(1, len(order)) if lengths[k] != lengths[k - 1]] + [len(order)]
    best = [(0, 0)]  # per cut: the cheapest cost of the sequences before it, and its group's first cut
    for b in range(1, len(cuts)):
        lo, hi, key_len = math.inf, -1, 0
        options = []
        for a in range(b - 1, -1, -1):  # the group order[cuts[a]:cuts[b]], grown to the left
            for i in order[cuts[a] : cuts[a + 1]]:
                lo, hi = min(lo, seqs[i].slot), max(hi, seqs[i].slot)
                key_len = max(key_len, seqs[i].cache_start + len(seqs[i].token_ids))
            options.append((best[a][0] + _padded_cost(int(hi - lo + 1), lengths[cuts[b] - 1], key_len), a))
        best.append(min(options))
    spans, b = [], len(cuts) - 1
    while b:
        spans.append(order[cuts[best[b][1]] : cuts[b]])
        b = best[b][1]
    return [run for members in reversed(spans) for run in _slot_runs(seqs, members)]


def _slot_runs(seqs: list[SequenceSlice], members: list[int]) -> list[list[int]]:
    """``members`` in slot order, cut wherever the slots between two would cost more padded than a call."""
    members = sorted(members, key=lambda i: seqs[i].slot)
    query_len = max(len(seqs[i].token_ids) for i in members)
    key_len = max(seqs[i].cache_start + len(seqs[i].token_ids) for i in members)
    runs = [[members[0]]]
    for prev, i in zip(members, members[1:]):
        gap = seqs[i].slot - seqs[prev].slot - 1
        if gap * key_len * (ROW_QUERIES + query_len) > CALL_COST:
            runs.append([i])
        else:
            runs[-1].append(i)
    return runs


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

    groups = []
    for members in attention_groups(seqs):
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
                token_index=index_tensor(token_index, device),
                row_index=index_tensor(row_index, device),
                mask=mask.to(device),
                direct=rows * query_len == len(input_ids)
                and token_index == row_index == list(range(len(input_ids))),
            )
        )

    return StepInputs(
        input_ids=index_tensor(input_ids, device),
        positions=index_tensor(positions, device),
        cache_slots=index_tensor(slots, device),
        cache_positions=index_tensor(cache_pos, device),
        groups=groups,
        logits_index=index_tensor(logits_index, device),
    )
