"""One rank's model shard and KV cache, and the forward step over them."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from specserve.config import EngineConfig
from specserve.distributed.parallel_state import TensorParallelGroup
from specserve.models.cuda_graphs import GraphedForward
from specserve.models.forward_batch import SequenceSlice, StepInputs, build_step_inputs
from specserve.models.kv_cache import KVCache
from specserve.models.linear_kernel import KernelPlan, PlanSource, WeightLayout, available_layouts, fastest_plan
from specserve.models.loader import load_model

logger = logging.getLogger(__name__)


def configured_plans(weight_layout: str, device: torch.device, dtype: torch.dtype) -> PlanSource:
    """The kernel plans ``EngineConfig.weight_layout`` asks for."""
    if weight_layout == "auto":
        return functools.partial(fastest_plan, device.type, dtype=dtype)
    if (layout := WeightLayout(weight_layout)) in available_layouts(device.type, dtype):
        return KernelPlan.single(layout)
    raise ValueError(f"weight_layout {layout.value!r} is not available for {dtype} on {device}")


class ModelRunner:
    def __init__(
        self, config: EngineConfig, model_path: Path, tp: TensorParallelGroup, plans: PlanSource | None = None
    ) -> None:
        """``plans`` overrides ``config.weight_layout`` (an int8 draft model)."""
        self.device = config.torch_device()
        self.dtype = config.torch_dtype()
        if self.device.type == "cuda":
            # cuDNN attention builds a plan per new key length (~50 ms on an H100), and an eager
            # decode step has a new one every step; the other SDPA kernels need no plan.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.model, self.max_model_len = load_model(
            model_path, tp, self.dtype, self.device, config.max_model_len,
            plans or configured_plans(config.weight_layout, self.device, self.dtype),
        )
        arch = self.model.arch
        use_graphs = self.device.type == "cuda" and tp.size == 1 and not config.enforce_eager
        self.kv_cache = KVCache(
            num_layers=arch.num_layers,
            num_slots=config.max_num_seqs + use_graphs,  # graphs write padding K/V to a scratch slot
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
        self.graphs = (
            GraphedForward(
                self.model,
                self.kv_cache,
                num_slots=config.max_num_seqs,
                max_model_len=self.max_model_len,
                max_tokens=config.cuda_graph_max_tokens,
                device=self.device,
            )
            if use_graphs
            else None
        )

    @torch.inference_mode()
    def forward(
        self, seqs: list[SequenceSlice], features: torch.Tensor | None = None, on_host: bool = True
    ) -> torch.Tensor:
        """Run one step; returns float32 logits [sum(len(s.logits_at)), vocab], computed, on
        the CPU or (``on_host=False``) where the model runs: the engine samples and verifies
        there, so that only token ids and top log-probabilities cross to the host.
        ``features``: one input feature per new token, for a model that reads them (EAGLE)."""
        if features is None and self.graphs is not None:
            graphed = self.graphs.run(seqs)
            if graphed is not None:
                return _finished(self.model.logits(*graphed), on_host)
        step = self._step_inputs(seqs)
        hidden = self.model.hidden_states(step, self.kv_cache, features)
        return _finished(self.model.logits(hidden, step.logits_index), on_host)

    @torch.inference_mode()
    def forward_with_hidden(
        self, seqs: list[SequenceSlice], features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward``, plus the float32 hidden states [T, hidden] of every new token (CPU)."""
        step = self._step_inputs(seqs)
        hidden = self.model.hidden_states(step, self.kv_cache, features)
        return _to_host(self.model.logits(hidden, step.logits_index)), _to_host(hidden.float())

    def _step_inputs(self, seqs: list[SequenceSlice]) -> StepInputs:
        return build_step_inputs(seqs, self.model.heads_per_kv, self.dtype, self.device)

    def keep_kv(self, moves: list[tuple[int, list[int], int]]) -> None:
        """Compact accepted tree paths: (slot, source positions, destination start) each."""
        for slot, sources, start in moves:
            self.kv_cache.keep(slot, sources, start)


def _finished(tensor: torch.Tensor, on_host: bool) -> torch.Tensor:
    """``tensor`` once computed (so that a step's measured time is its own), on the host if asked."""
    if on_host or tensor.device.type != "cuda":
        return _to_host(tensor)
    torch.cuda.current_stream(tensor.device).synchronize()
    return tensor


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the CPU. A CUDA tensor goes through pinned memory: a verified token tree's
    full-vocabulary logits are tens of MB, which a pageable copy moves several times slower."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host
