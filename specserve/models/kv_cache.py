"""KV cache: one contiguous slot of ``max_len`` positions per sequence, per layer.

Contiguous slots let a batch's attention read ``cache[lo:hi]`` as a view (no gather), which on a
CPU is worth more than the memory a paged layout saves: gathering scattered blocks would copy
every cached key and value of the batch on every layer of every step. Capacity is explicit:
``num_slots`` sequences of up to ``max_len`` tokens each.
"""

from __future__ import annotations

import heapq

import torch
import torch.nn.functional as F

from specserve.models.forward_batch import StepInputs

# Positions per slot when neither the config nor the model asks for fewer: every slot reserves
# them all, so this bounds the cache's memory for a model with a long context.
DEFAULT_MAX_MODEL_LEN = 2048


class KVCache:
    """Key and value tensors ``[num_slots, kv_heads, max_len, head_dim]`` for every layer."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_slots, kv_heads, max_len, head_dim)
        # Zeroed, not empty: padded attention multiplies masked positions by a zero weight, and
        # 0 * NaN (uninitialised memory) would still poison the output.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.max_len = max_len

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepInputs
    ) -> torch.Tensor:
        """Store the step's new K/V of ``layer``, then attend q [T, heads, D] to each slot.

        Returns [T, heads * D]. Query heads are grouped by the KV head they share (GQA), so no
        key or value is ever repeated.
        """
        keys, values = self.keys[layer], self.values[layer]
        num_tokens, heads, head_dim = q.shape
        kv_heads = keys.shape[1]
        index = self.write_index(step)
        keys.view(-1, head_dim).index_copy_(0, index, k.reshape(-1, head_dim))
        values.view(-1, head_dim).index_copy_(0, index, v.reshape(-1, head_dim))
        group_size = heads // kv_heads
        out = q.new_empty(num_tokens, heads * head_dim)
        for g in step.groups:
            if g.direct:
                padded = q
            else:
                padded = q.new_zeros(g.rows * g.query_len, heads, head_dim)
                padded[g.row_index] = q[g.token_index]
            grouped = (
                padded.view(g.rows, g.query_len, kv_heads, group_size, head_dim)
                .permute(0, 2, 3, 1, 4)
                .reshape(g.rows, kv_heads, group_size * g.query_len, head_dim)
            )
            rows = slice(g.slot_lo, g.slot_lo + g.rows)
            attn = F.scaled_dot_product_attention(
                grouped,
                keys[rows, :, : g.key_len],
                values[rows, :, : g.key_len],
                attn_mask=g.mask,
            )
            ungrouped = (
                attn.view(g.rows, kv_heads, group_size, g.query_len, head_dim)
                .permute(0, 3, 1, 2, 4)
                .reshape(g.rows * g.query_len, heads * head_dim)
            )
            if g.direct:
                return ungrouped
            out[g.token_index] = ungrouped[g.row_index]
        return out

    def write_index(self, step: StepInputs) -> torch.Tensor:
        """Rows of the flattened cache that receive the step's new K/V, [T * kv_heads]."""
        if step.kv_write_index is None:
            _, kv_heads, max_len, _ = self.keys[0].shape
            base = (step.cache_slots * kv_heads * max_len + step.cache_positions).unsqueeze(1)
            heads = torch.arange(kv_heads, device=base.device) * max_len
            step.kv_write_index = (base + heads).flatten()
        return step.kv_write_index

    def keep(self, slot: int, src_positions: list[int], dst_start: int) -> None:
        """Move the K/V at ``src_positions`` of ``slot`` to ``dst_start, dst_start+1, ...``.

        Used after tree verification: the accepted path's entries become contiguous and the
        rest of the tree is simply overwritten by later steps.
        """
        src = torch.tensor(src_positions, device=self.keys[0].device)
        dst = slice(dst_start, dst_start + len(src_positions))
        for cache in self.keys + self.values:
            cache[slot, :, dst] = cache[slot, :, src]


class SlotAllocator:
    """Hands out KV slots, lowest free first so running sequences stay in a compact range."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots))
        heapq.heapify(self._free)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        """A free slot, or None when the cache is full (the caller keeps the request waiting)."""
        return heapq.heappop(self._free) if self._free else None

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        heapq.heappush(self._free, slot)
