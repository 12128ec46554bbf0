"""An EAGLE draft head (Li et al., 2024): drafting from the target's own features.

Position i of the draft reads ``[embedding(token_i) ; f_{i-1}]``, where ``f_{i-1}`` is the
target's final-norm hidden state at the previous position (the feature the target's head turned
into token_i), projects it back to the hidden size, runs it through Llama decoder layers and a
final norm, and outputs a prediction of ``f_i``, which the (tied, target-derived) head scores. Behind the root
the draft has no target features, so a tree node reads the prediction made at its parent.

Checkpoint: ``config.json`` of a Llama model whose ``architectures`` is ``["EagleLlamaDraft"]``
and tensors ``embed_tokens.weight``, ``fc.weight`` ([hidden, 2 * hidden]), ``layers.N.*`` and
``norm.weight`` named as in Hugging Face's Llama.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from specserve.distributed.parallel_state import TensorParallelGroup
from specserve.models.architecture import ModelArchitecture
from specserve.models.forward_batch import StepInputs
from specserve.models.kv_cache import KVCache
from specserve.models.layers import ParallelLMHead, RowParallelLinear
from specserve.models.llama import LlamaModel, LMHeadMixin, load_weights

EAGLE_ARCHITECTURE = "EagleLlamaDraft"


def is_eagle_draft(path: Path) -> bool:
    """Whether the model directory holds an EAGLE draft (it reads the target's features)."""
    config = json.loads((Path(path) / "config.json").read_text())
    return EAGLE_ARCHITECTURE in (config.get("architectures") or [])


class EagleDraftModel(LMHeadMixin, LlamaModel):
    """The decoder of ``LlamaModel`` (same tensor names) behind ``fc``, with a tied head."""

    def __init__(self, arch: ModelArchitecture, tp: TensorParallelGroup, max_positions: int) -> None:
        super().__init__(arch, tp, max_positions)
        self.arch = arch
        self.fc = RowParallelLinear(2 * arch.hidden_size, arch.hidden_size, bias=False, tp=tp)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, tp)

    def hidden_states(
        self, step: StepInputs, cache: KVCache, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicted target features [T, hidden]; ``features`` [T, hidden] are the inputs'
        previous-position features (the target's, or the draft's own predictions)."""
        if features is None or features.shape != (len(step.input_ids), self.arch.hidden_size):
            raise ValueError(f"an EAGLE draft needs one input feature of size {self.arch.hidden_size} per token")
        embeds = self.embed_tokens(step.input_ids)
        x = self.fc(torch.cat([embeds, features.to(embeds.device, embeds.dtype)], dim=-1))
        return self.decode(x, step, cache)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_weights(self, weights, tied=True)
