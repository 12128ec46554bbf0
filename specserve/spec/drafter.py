"""The interface every drafter implements."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from specserve.spec.tree import TokenTree, TreeBudget


@dataclass
class DraftRequest:
    request_id: str
    slot: int  # the request's KV slot (a draft model uses the same index in its own cache)
    token_ids: list[int]  # the whole sequence; the last token is the tree's root
    budget: TreeBudget
    # For a drafter that reads the target's features (EAGLE): the target's final hidden states
    # [n, hidden] of the positions the target cached since this request's last DraftRequest.
    features: torch.Tensor | None = None


KeepGoing = Callable[[int, list[TokenTree]], bool]
"""Asked after each draft level with the level reached and the trees so far: grow another?"""


class Drafter(Protocol):
    needs_target_features: bool  # whether DraftRequests must carry the target's features
    gives_acceptance_hints: bool  # whether the engine asks acceptance_hint before planning
    # Tokens fed to each draft-model forward of the last propose (catch-up included; empty
    # without a model), so that the drafting time can be set against the cost model's.
    forwards: Sequence[int]

    def propose(self, requests: list[DraftRequest], keep_going: KeepGoing | None = None) -> list[TokenTree]:
        """One tree per request, within its budget (an empty tree when it has nothing)."""
        ...

    def acceptance_hint(self, request_id: str, token_ids: list[int]) -> float | None:
        """Before the controller plans a step: this drafter's own estimate of how likely the
        target accepts its next token for the request (None: no better guess than the history).
        Asked only of drafters with ``gives_acceptance_hints``."""
        ...

    def read(self, requests: list[DraftRequest]) -> None:
        """Cache the requests' sequences without drafting (their prompts, in the step that
        prefills them), so that their first trees feed only their roots (nothing without a model)."""
        ...

    def pending(self, request_id: str, num_tokens: int) -> int:
        """Tokens a draft model would feed before drafting the request's next tree when the
        request holds ``num_tokens``: the root and what the draft has not cached (0 without a
        model). Asked before the controller plans a step, to price the catch-up."""
        ...

    def accept(self, request_id: str, tokens: list[int]) -> None:
        """The target accepted ``tokens`` (a path of the last tree, bonus token excluded)."""
        ...

    def release(self, request_id: str) -> None:
        """The request finished or was aborted: forget its state."""
        ...
