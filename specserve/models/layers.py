"""Building blocks of a Llama-family decoder, sharded over a tensor-parallel group.

Column-parallel linears split their output features over ranks, row-parallel linears their
input features (followed by an all-reduce), as in Megatron-LM. Each parameter knows how to take
its shard out of a full checkpoint tensor (``load``), so the loader stays generic.

Linear weights load in the checkpoint's ``[out, in]`` layout; ``apply_kernel_plan`` then stores
them in the layouts whose GEMMs are fastest on the device (see ``linear_kernel``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specserve.distributed.parallel_state import TensorParallelGroup
from specserve.models.linear_kernel import KernelPlan, PlannedWeight, PlanSource, WeightLayout, linear


def divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size ({parts})")
    return total // parts


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def load(self, name: str, tensor: torch.Tensor) -> None:
        self.weight.copy_(tensor)


class PlannedLinear(nn.Module):
    """A linear layer whose ``weight`` loads output-major and is then stored as a plan says."""

    kernel: PlannedWeight | None = None

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kernel is None:
            return linear(x, self.weight, bias, WeightLayout.OUTPUT_MAJOR)
        return self.kernel(x, bias)

    def apply_plan(self, plan: KernelPlan) -> None:
        if self.kernel is not None:
            raise ValueError("a kernel plan is applied once, after loading")
        self.kernel = PlannedWeight(self.weight.detach(), plan)
        del self.weight  # the plan holds the weight now, in the layouts it multiplies with


class MergedColumnParallelLinear(PlannedLinear):
    """Several linears sharing one input (q/k/v or gate/up), fused into one matmul.

    ``output_sizes`` are the full (unsharded) sizes; each is split over the TP ranks and the
    local shards are concatenated, so the local output is ``[shard_0 | shard_1 | ...]``.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: dict[str, int],
        bias: bool,
        tp: TensorParallelGroup,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.local_sizes = {k: divide(v, tp.size, k) for k, v in output_sizes.items()}
        offsets, start = {}, 0
        for name, size in self.local_sizes.items():
            offsets[name] = start
            start += size
        self.offsets = offsets
        self.weight = nn.Parameter(torch.empty(start, input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(start), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def load(self, name: str, tensor: torch.Tensor) -> None:
        """``name`` is '<part>.weight' or '<part>.bias' with part one of ``output_sizes``."""
        part, kind = name.rsplit(".", 1)
        size = self.local_sizes[part]
        shard = tensor.narrow(0, self.tp.rank * size, size)
        if kind == "weight":
            self.weight.narrow(0, self.offsets[part], size).copy_(shard)
        else:
            self.bias.narrow(0, self.offsets[part], size).copy_(shard)


class RowParallelLinear(PlannedLinear):
    """Input features split over ranks; partial products are summed with an all-reduce."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool, tp: TensorParallelGroup
    ) -> None:
        super().__init__()
        self.tp = tp
        self.local_input = divide(input_size, tp.size, "row-parallel input size")
        self.weight = nn.Parameter(torch.empty(output_size, self.local_input), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(output_size), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_reduce(self.matmul(x, None))
        return out if self.bias is None else out + self.bias

    def load(self, name: str, tensor: torch.Tensor) -> None:
        if name == "bias":
            self.bias.copy_(tensor)
        else:
            self.weight.copy_(tensor.narrow(1, self.tp.rank * self.local_input, self.local_input))


class _VocabShard(nn.Module):
    """This rank's contiguous share of the vocabulary."""

    def __init__(self, vocab_size: int, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.tp = tp
        self.local_vocab = divide(vocab_size, tp.size, "vocab_size")
        self.vocab_start = tp.rank * self.local_vocab

    def shard_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full ``[vocab, ...]`` checkpoint tensor."""
        return tensor.narrow(0, self.vocab_start, self.local_vocab)


class VocabParallelEmbedding(_VocabShard):
    """Embedding table split by vocabulary rows."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallelGroup) -> None:
        super().__init__(vocab_size, tp)
        self.weight = nn.Parameter(torch.empty(self.local_vocab, hidden_size), requires_grad=False)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.vocab_start
        outside = (local < 0) | (local >= self.local_vocab)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out)

    def load(self, name: str, tensor: torch.Tensor) -> None:
        self.weight.copy_(self.shard_rows(tensor))


class ParallelLMHead(_VocabShard, PlannedLinear):
    """LM head split by vocabulary columns; a tied head is loaded from the embedding tensor."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallelGroup) -> None:
        super().__init__(vocab_size, tp)
        self.weight = nn.Parameter(torch.empty(self.local_vocab, hidden_size), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (gathered from every rank's shard)."""
        return self.tp.all_gather_last_dim(self.matmul(hidden, None))

    def load(self, name: str, tensor: torch.Tensor) -> None:
        self.weight.copy_(self.shard_rows(tensor))


def apply_kernel_plan(module: nn.Module, plans: PlanSource) -> None:
    """Store every linear weight under ``module`` (just loaded) as the plan for its shape
    multiplies it."""
    for child in module.modules():
        if isinstance(child, PlannedLinear):
            child.apply_plan(plans(tuple(child.weight.shape)))


class RotaryEmbedding(nn.Module):
    """RoPE with a precomputed cos/sin table; ``inv_freq`` comes from the model config."""

    def __init__(
        self, inv_freq: torch.Tensor, attention_scaling: float, max_positions: int
    ) -> None:
        super().__init__()
        positions = torch.arange(max_positions, dtype=torch.float32)  # on the default device
        freqs = torch.outer(positions, inv_freq.to(positions.device, torch.float32))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * attention_scaling, persistent=False)

        # rotate_half(x) * sin == swap_halves(x) * signed_sin, which saves a negation per call.
        half = inv_freq.numel()
        signed_sin = torch.cat((-emb.sin()[:, :half], emb.sin()[:, half:]), dim=-1)
        self.register_buffer("signed_sin", signed_sin * attention_scaling, persistent=False)

    def table(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin rows for ``positions``, shaped [tokens, 1, head_dim]."""
        return (
            self.cos[positions].unsqueeze(1).to(dtype),
            self.signed_sin[positions].unsqueeze(1).to(dtype),
        )

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [tokens, heads, head_dim] (HF's rotate_half convention)."""
        half = x.shape[-1] // 2
        swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
        return torch.addcmul(x * cos, swapped, signed_sin)
