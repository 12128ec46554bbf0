"""One rank's model shard and KV cache, and the forward step over them."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from specserve.config import EngineConfig
from specserve.distributed.parallel_state import TensorParallelGroup
from specserve.models.forward_batch import SequenceSlice, build_step_inputs
from specserve.models.kv_cache import KVCache
from specserve.models.linear_kernel import KernelPlan, WeightLayout, fastest_plan
from specserve.models.loader import load_model

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: Path, tp: TensorParallelGroup) -> None:
        self.device = config.torch_device()
        self.dtype = config.torch_dtype()
        plan = (
            fastest_plan(self.device.type)
            if config.weight_layout == "auto"
            else KernelPlan.single(WeightLayout(config.weight_layout))
        )
        self.model, self.max_model_len = load_model(
            model_path, tp, self.dtype, self.device, config.max_model_len, plan
        )
        arch = self.model.arch
        self.kv_cache = KVCache(
            num_layers=arch.num_layers,
            num_slots=config.max_num_seqs,
            kv_heads=arch.num_kv_heads // tp.size,
            max_len=self.max_model_len,
            head_dim=arch.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        logger.info(
            "KV cache: %d slots x %d tokens, %.2f GiB on %s",
            config.max_num_seqs, self.max_model_len, self.kv_cache.nbytes() / 2**30, self.device,
        )

    @torch.inference_mode()
    def forward(self, seqs: list[SequenceSlice], features: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step; returns float32 logits [sum(len(s.logits_at)), vocab] on the CPU.
        ``features``: one input feature per new token, for a model that reads them (EAGLE)."""
        step = build_step_inputs(seqs, self.model.heads_per_kv, self.dtype, self.device)
        hidden = self.model.hidden_states(step, self.kv_cache, features)
        return self.model.logits(hidden, step).cpu()

    @torch.inference_mode()
    def forward_with_hidden(
        self, seqs: list[SequenceSlice], features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward``, plus the float32 hidden states [T, hidden] of every new token (CPU)."""
        step = build_step_inputs(seqs, self.model.heads_per_kv, self.dtype, self.device)
        hidden = self.model.hidden_states(step, self.kv_cache, features)
        return self.model.logits(hidden, step).cpu(), hidden.float().cpu()

    def keep_kv(self, moves: list[tuple[int, list[int], int]]) -> None:
        """Compact accepted tree paths: (slot, source positions, destination start) each."""
        for slot, sources, start in moves:
            self.kv_cache.keep(slot, sources, start)
