"""CUDA graphs of small forward steps, one per (rows, query length, key length) bucket.

A small step on a GPU is bound by kernel launches rather than by the GPU: an 8B decode step at
batch 1 launches hundreds of kernels that each finish before the CPU has queued the next. A
captured graph replays them all with one launch. Its shapes are fixed, so a step is padded to
the smallest bucket that holds it:

- rows: KV slots ``0..rows-1`` (a row per slot, as in the eager path's padded attention group);
- query length: new tokens per row (decode 1, draft frontiers and token trees a few);
- key length: cached plus new positions per row.

Padded tokens write their K/V to a scratch slot no sequence owns (slot ``num_slots``: the cache
holds one slot more than the engine hands out), and padded query rows see key 0 only. The
attention mask is computed inside the graph from three numbers per row and a small window of
mask bits (the new tokens' causal or tree mask), so the CPU builds only small tensors.
Warm-up and capture rerun the real step, which is idempotent: the same K/V land in the same places.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specserve.models.forward_batch import AttentionGroup, SequenceSlice, StepInputs
from specserve.models.kv_cache import KVCache

QUERY_BUCKETS = (1, 2, 4, 8, 16)
MIN_KEY_BUCKET = 128
# Most positions, from the first masked one on, a step's mask may differ from plain causal.
MASK_WINDOW = 64


def _powers_of_two(lo: int, hi: int) -> list[int]:
    """lo, 2*lo, 4*lo, ... below hi, then hi itself."""
    sizes, size = [], lo
    while size < hi:
        sizes.append(size)
        size *= 2
    return sizes + [hi]


def _smallest_at_least(value: int, sizes: list[int] | tuple[int, ...]) -> int | None:
    return next((size for size in sizes if size >= value), None)


@dataclass
class _Buffers:
    """Device tensors every graph reads; a step's inputs are copied into their leading part."""

    input_ids: torch.Tensor  # [max_rows * max_query], padded layout: row r's tokens at r * query_len
    positions: torch.Tensor
    cache_slots: torch.Tensor
    cache_positions: torch.Tensor
    mask_start: torch.Tensor  # [max_rows] first cache position the window covers
    window_len: torch.Tensor  # [max_rows] positions in the window (0 for a padding row)
    num_new: torch.Tensor  # [max_rows] new tokens of the row
    window: torch.Tensor  # [max_rows, max_query, MASK_WINDOW] bool: query i sees mask_start + j


class GraphedForward:
    """Runs ``model.hidden_states`` for steps that fit a bucket as a replayed CUDA graph.

    ``capture=False`` runs the same padded step eagerly, which is how CPU tests check the
    padding and the in-graph mask.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCache,
        *,
        num_slots: int,
        max_model_len: int,
        max_tokens: int,
        device: torch.device,
        capture: bool = True,
    ) -> None:
        if kv_cache.num_slots != num_slots + 1:
            raise ValueError("the KV cache needs one scratch slot beyond the num_slots sequences use")
        self.model = model
        self.kv_cache = kv_cache
        self.scratch_slot = num_slots
        self.max_tokens = max_tokens
        self.device = device
        self.capture = capture
        self.row_buckets = _powers_of_two(1, num_slots)
        self.key_buckets = _powers_of_two(min(MIN_KEY_BUCKET, max_model_len), max_model_len)
        self.dtype = kv_cache.keys[0].dtype
        max_query = QUERY_BUCKETS[-1]

        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        tokens = num_slots * max_query
        self.buffers = _Buffers(
            input_ids=zeros(tokens),
            positions=zeros(tokens),
            cache_slots=zeros(tokens),
            cache_positions=zeros(tokens),
            mask_start=zeros(num_slots),
            window_len=zeros(num_slots),
            num_new=zeros(num_slots),
            window=zeros(num_slots, max_query, MASK_WINDOW, dtype=torch.bool),
        )
        self._graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def bucket(self, seqs: list[SequenceSlice]) -> tuple[int, int, int] | None:
        """(rows, query length, key length) of the smallest bucket holding the step, or None."""
        if not seqs:
            return None
        rows = _smallest_at_least(max(s.slot for s in seqs) + 1, self.row_buckets)
        query_len = _smallest_at_least(max(len(s.token_ids) for s in seqs), QUERY_BUCKETS)
        key_len = _smallest_at_least(max(s.cache_start + len(s.token_ids) for s in seqs), self.key_buckets)
        widest_window = max(s.cache_start + len(s.token_ids) - s.mask_start for s in seqs)
        if rows is None or query_len is None or key_len is None or widest_window > MASK_WINDOW:
            return None
        if rows * query_len > self.max_tokens:
            return None
        return rows, query_len, key_len

    def run(self, seqs: list[SequenceSlice]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Hidden states of the padded step [rows * query_len, hidden] and the positions in it of
        the slices' ``logits_at`` tokens (in slice order); None when no bucket holds the step."""
        key = self.bucket(seqs)
        if key is None:
            return None
        rows, query_len, key_len = key
        logits_index = self._load_inputs(seqs, rows, query_len)
        if not self.capture:
            return self._hidden_states(rows, query_len, key_len), logits_index
        if key not in self._graphs:
            self._graphs[key] = self._capture(rows, query_len, key_len)
        graph, hidden = self._graphs[key]
        graph.replay()
        return hidden, logits_index

    def _load_inputs(self, seqs: list[SequenceSlice], rows: int, query_len: int) -> torch.Tensor:
        """Copy the step into the buffers' leading ``rows * query_len`` tokens and ``rows`` rows."""
        tokens = rows * query_len
        input_ids, positions = [0] * tokens, [0] * tokens
        cache_slots, cache_positions = [self.scratch_slot] * tokens, [0] * tokens
        mask_start, window_len, num_new = [0] * rows, [0] * rows, [0] * rows
        window = torch.zeros(rows, query_len, MASK_WINDOW, dtype=torch.bool)
        logits_index = []
        for seq in seqs:
            n, base = len(seq.token_ids), seq.slot * query_len
            new = slice(base, base + n)
            input_ids[new] = seq.token_ids
            positions[new] = seq.positions
            cache_slots[new] = [seq.slot] * n
            cache_positions[new] = range(seq.cache_start, seq.cache_start + n)
            if seq.tree_mask is None:  # causal: the window is the new tokens
                start, bits = seq.cache_start, torch.ones(n, n, dtype=torch.bool).tril()
            else:
                start, bits = seq.mask_start, seq.tree_mask
            width = bits.shape[1]
            mask_start[seq.slot], window_len[seq.slot], num_new[seq.slot] = start, width, n
            window[seq.slot, :n, :width] = bits
            logits_index.extend(base + i for i in seq.logits_at)
        b = self.buffers
        for buffer, values in (
            (b.input_ids, input_ids), (b.positions, positions), (b.cache_slots, cache_slots),
            (b.cache_positions, cache_positions), (b.mask_start, mask_start),
            (b.window_len, window_len), (b.num_new, num_new),
        ):
            buffer[: len(values)].copy_(torch.tensor(values, dtype=torch.long))
        b.window[:rows, :query_len].copy_(window)
        return torch.tensor(logits_index, dtype=torch.long, device=self.device)

    def _hidden_states(self, rows: int, query_len: int, key_len: int) -> torch.Tensor:
        """The model over the buffers' padded step (what a graph captures)."""
        b, tokens = self.buffers, rows * query_len
        step = StepInputs(
            input_ids=b.input_ids[:tokens],
            positions=b.positions[:tokens],
            cache_slots=b.cache_slots[:tokens],
            cache_positions=b.cache_positions[:tokens],
            groups=[
                AttentionGroup(
                    slot_lo=0,
                    rows=rows,
                    query_len=query_len,
                    key_len=key_len,
                    token_index=b.input_ids[:0],
                    row_index=b.input_ids[:0],
                    mask=self._attention_mask(rows, query_len, key_len),
                    direct=True,
                )
            ],
            logits_index=b.input_ids[:0],
        )
        return self.model.hidden_states(step, self.kv_cache)

    def _attention_mask(self, rows: int, query_len: int, key_len: int) -> torch.Tensor:
        """Additive mask [rows, 1, heads_per_kv * query_len, key_len], as ``build_step_inputs``
        makes it: positions before the window are visible, the window's bits decide inside it,
        nothing after it is visible, and padding queries see key 0."""
        b = self.buffers
        key = torch.arange(key_len, device=self.device)
        query = torch.arange(query_len, device=self.device)
        offset = key[None, None, :] - b.mask_start[:rows, None, None]  # [rows, 1, key_len]
        in_window = (offset >= 0) & (offset < b.window_len[:rows, None, None])
        bits = b.window[:rows, :query_len].gather(
            2, offset.clamp(0, MASK_WINDOW - 1).expand(rows, query_len, key_len)
        )
        visible = (offset < 0) | (in_window & bits)
        visible &= (query[None, :] < b.num_new[:rows, None])[:, :, None]
        visible[..., 0] |= ~visible.any(-1)
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~visible, float("-inf"))
        heads_per_kv = self.model.heads_per_kv
        return (
            mask.unsqueeze(1)
            .expand(rows, heads_per_kv, query_len, key_len)
            .reshape(rows, 1, heads_per_kv * query_len, key_len)
        )

    def _capture(self, rows: int, query_len: int, key_len: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # lets lazy initialisation (cuBLAS handles, workspaces) happen outside
                self._hidden_states(rows, query_len, key_len)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            hidden = self._hidden_states(rows, query_len, key_len)
        return graph, hidden
