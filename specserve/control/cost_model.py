"""The hardware cost model: profiled forward latencies, interpolated.

A :class:`LatencyTable` holds latencies (ms) measured on a grid of (tokens in the step, context
length); between grid points it interpolates linearly, beyond the grid it extrapolates the last
segment linearly. A :class:`CostModel` pairs the target's table with the draft's and predicts
the time of a whole iteration: the draft forwards that grow the trees, then one target forward.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from specserve.models.default_model import cache_root


def _interpolate(xs: list[int], ys: list[float], x: float) -> float:
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_right(xs, x) - 1, 0), len(xs) - 2)
    slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
    return ys[i] + slope * (x - xs[i])


class TokenGrid:
    """The token counts a latency curve is given at, in the array forms that evaluating many
    counts at once needs (made once per profile table, shared by every curve cut from it)."""

    __slots__ = ("tokens", "inner", "xs", "widths")

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.xs = np.array(tokens, dtype=float)
        self.inner = self.xs[1:-1]  # searching these gives the segment; the end ones extrapolate
        self.widths = self.xs[1:] - self.xs[:-1] if len(tokens) > 1 else np.ones(1)


@functools.cache
def _token_grid(tokens: tuple[int, ...]) -> TokenGrid:
    """One grid per distinct set of token counts (a model is immutable once validated, but
    ``model_copy(update=...)`` would carry a value cached on it over to a changed copy)."""
    return TokenGrid(list(tokens))


class LatencyCurve:
    """Latency in ms as a function of tokens alone, at one context length: linear between the
    grid's token counts and beyond both ends."""

    __slots__ = ("grid", "ms", "_arrays")

    def __init__(self, grid: TokenGrid, ms: list[float]) -> None:
        self.grid, self.ms = grid, ms
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, tokens: float) -> float:
        return max(_interpolate(self.grid.tokens, self.ms, tokens), 0.0) if tokens > 0 else 0.0

    def many(self, tokens: np.ndarray) -> np.ndarray:
        """``self(t)`` for every ``t`` of ``tokens`` at once (the same arithmetic)."""
        if self._arrays is None:
            ys = np.array(self.ms, dtype=float)
            self._arrays = ys, (ys[1:] - ys[:-1]) / self.grid.widths if len(ys) > 1 else np.zeros(1)
        ys, slopes = self._arrays
        segment = np.searchsorted(self.grid.inner, tokens, side="right")
        out = ys[segment] + slopes[segment] * (tokens - self.grid.xs[segment])
        return np.maximum(out, 0.0) * (tokens > 0)


class LatencyTable(BaseModel):
    """Latency in ms of one forward, ``ms[c][t]`` for ``contexts[c]`` and ``tokens[t]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: list[int] = Field(min_length=1)
    contexts: list[int] = Field(min_length=1)
    ms: list[list[float]]

    @model_validator(mode="after")
    def _grid_shape(self) -> LatencyTable:
        if self.tokens != sorted(set(self.tokens)) or self.contexts != sorted(set(self.contexts)):
            raise ValueError("tokens and contexts must be strictly increasing")
        if len(self.ms) != len(self.contexts) or any(len(row) != len(self.tokens) for row in self.ms):
            raise ValueError("ms must have one row per context and one entry per token count")
        return self

    @property
    def grid(self) -> TokenGrid:
        return _token_grid(tuple(self.tokens))

    def at_context(self, context: float) -> LatencyCurve:
        """The table's slice at mean ``context`` length (interpolated between profiled rows)."""
        ms = [_interpolate(self.contexts, list(column), context) for column in zip(*self.ms)]
        return LatencyCurve(self.grid, ms)

    def __call__(self, tokens: float, context: float) -> float:
        """Predicted ms of a forward with ``tokens`` new tokens at mean ``context`` length."""
        return self.at_context(context)(tokens)


class StepCost:
    """The cost model at one iteration's mean context: every query of a step is about tokens.

    A target forward that verifies drafted nodes is priced on a curve of its own, ``verify_ms``
    (the same profile, corrected apart: see :class:`CorrectedCost`); a forward without any on
    ``target_ms``.
    """

    def __init__(self, target: LatencyCurve, draft: LatencyCurve | None, verify: LatencyCurve | None = None) -> None:
        self.target_ms = target
        self.verify_ms = target if verify is None else verify
        self._draft = draft

    def draft_ms(self, tokens: float) -> float:
        return 0.0 if self._draft is None else self._draft(tokens)

    def draft_ms_many(self, tokens: np.ndarray) -> np.ndarray:
        """``draft_ms(t)`` for every ``t`` of ``tokens`` at once (0 for none)."""
        return np.zeros(tokens.shape) if self._draft is None else self._draft.many(tokens)

    def forward_ms(self, base_tokens: float, nodes: float) -> float:
        """The target forward of ``base_tokens`` (prefill chunks, one root per decoding request)
        and ``nodes`` drafted nodes to verify."""
        return self.verify_ms(base_tokens + nodes) if nodes else self.target_ms(base_tokens)

    def forward_ms_many(self, base_tokens: int, nodes: np.ndarray) -> np.ndarray:
        """``forward_ms(base_tokens, n)`` for every ``n`` of ``nodes`` at once."""
        return np.where(nodes > 0, self.verify_ms.many(base_tokens + nodes), self.target_ms(base_tokens))

    def iteration_ms(self, base_tokens: float, nodes: float, draft_tokens: list[float]) -> float:
        """A draft forward per entry of ``draft_tokens``, then the target forward verifying ``nodes``."""
        return sum(self.draft_ms(n) for n in draft_tokens) + self.forward_ms(base_tokens, nodes)

    def scaled(self, target: float, draft: float, verify: float) -> StepCost:
        """Plain target, draft and verifying latencies times ``target``, ``draft``, ``verify``."""
        def scale(curve: LatencyCurve, factor: float) -> LatencyCurve:
            return LatencyCurve(curve.grid, [ms * factor for ms in curve.ms])

        draft_curve = None if self._draft is None else scale(self._draft, draft)
        return StepCost(scale(self.target_ms, target), draft_curve, scale(self.target_ms, verify))


class CostModel(BaseModel):
    """Profiled latencies of one target (and its draft) on one device and TP size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    device: str
    tensor_parallel_size: int = 1
    target: LatencyTable
    draft: LatencyTable | None = Field(
        default=None, description="Draft-model forward latency; None: drafting costs nothing."
    )

    def at_context(self, context: float) -> StepCost:
        return StepCost(self.target.at_context(context), None if self.draft is None else self.draft.at_context(context))

    def target_ms(self, tokens: float, context: float) -> float:
        return self.target(tokens, context)

    def draft_ms(self, tokens: float, context: float) -> float:
        return 0.0 if self.draft is None else self.draft(tokens, context)

    def prefill_s(self, tokens: int) -> float:
        """Predicted seconds to prefill a prompt of ``tokens`` (what a TTFT deadline must leave)."""
        return self.target(tokens, 0) / 1e3

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=1))

    @classmethod
    def load(cls, path: Path) -> CostModel:
        return cls.model_validate_json(Path(path).read_text())


# Part of a cached profile's key, raised when what a profile measures changes (its grid; the
# kernel plans, which set what a step of few rows costs): an older profile is measured again.
PROFILE_VERSION = 3


def profile_path(model_dirs: list[Path], device: str, tensor_parallel_size: int, hardware: str) -> Path:
    """Where the profile of these models (target first, then draft) on this device is cached.

    The key holds the target's directory name and a digest of every model's config and of the
    ``hardware``'s name (CPU or GPU model), so two models that share a directory name, or two
    machines that share a cache, never share a profile.
    """
    digest = hashlib.sha1(f"{hardware}|profile {PROFILE_VERSION}".encode())
    for model_dir in model_dirs:
        digest.update((Path(model_dir) / "config.json").read_bytes())
    name = f"{Path(model_dirs[0]).name}-{digest.hexdigest()[:10]}-{device}-tp{tensor_parallel_size}"
    return cache_root() / "profiles" / f"{name.replace(':', '')}.json"


class _RatioEMA:
    """A running mean of observed over predicted time; one observation's ratio is clamped, so
    that a stall cannot swing it."""

    def __init__(self, weight: float = 0.1, clamp: tuple[float, float] = (0.25, 4.0)) -> None:
        self.value: float | None = None
        self._weight, self._clamp = weight, clamp

    def observe(self, predicted_ms: float, seconds: float, start: float) -> None:
        """Fold in one observation; the first starts from ``start``."""
        if predicted_ms <= 0:
            return
        ratio = min(max(seconds * 1e3 / predicted_ms, self._clamp[0]), self._clamp[1])
        value = start if self.value is None else self.value
        self.value = value + self._weight * (ratio - value)


class CorrectedCost:
    """A profile scaled online by how fast the machine runs now.

    Profiles drift (clock, thermal state, neighbours on a shared machine; 2-3x between sessions
    here), so the controller keeps running ratios of observed over profiled time and scales
    every prediction by them:

    - plain steps: the target forward and sampling its output on the host;
    - verifying steps, apart: besides the drift they hold what a profile of plain forwards cannot,
      tree masks and verifying every request's tree on the host, which make such a step cost more
      than a plain one of as many tokens;
    - drafting: the whole drafting time over the profiled draft forwards it ran, which holds the
      draft catching up on accepted tokens, building the trees, a prompt lookup beside it and
      the round trip to a draft actor.

    Until verifying or drafting is observed, its ratio follows the plain one.
    """

    def __init__(self, profile: CostModel) -> None:
        self.profile = profile
        self._target = _RatioEMA()
        self._verify = _RatioEMA()
        self._draft = _RatioEMA()

    @property
    def scale(self) -> float:
        """Observed over profiled time of plain steps."""
        return 1.0 if self._target.value is None else self._target.value

    @property
    def verify_scale(self) -> float:
        """Observed over profiled time of steps that verify drafted nodes."""
        return self.scale if self._verify.value is None else self._verify.value

    @property
    def draft_scale(self) -> float:
        """Observed drafting time over profiled draft-forward time."""
        return self.scale if self._draft.value is None else self._draft.value

    def observe_forward(self, tokens: int, context: float, seconds: float, verified: bool = False) -> None:
        """A step's target forward of ``tokens`` new tokens at mean ``context``, with sampling or
        (``verified``) verifying its output, took ``seconds``."""
        predicted_ms = self.profile.target_ms(tokens, context)
        if verified:
            self._verify.observe(predicted_ms, seconds, start=self.scale)
        else:
            self._target.observe(predicted_ms, seconds, start=1.0)

    def observe_draft(self, forwards: Sequence[int], context: float, seconds: float) -> None:
        """Drafting with one draft forward of each of ``forwards`` tokens took ``seconds``."""
        predicted_ms = sum(self.profile.draft_ms(tokens, context) for tokens in forwards)
        self._draft.observe(predicted_ms, seconds, start=self.scale)

    def at_context(self, context: float) -> StepCost:
        step = self.profile.at_context(context)
        scales = (self.scale, self.draft_scale, self.verify_scale)
        return step if scales == (1.0, 1.0, 1.0) else step.scaled(*scales)

    def prefill_s(self, tokens: int) -> float:
        return self.profile.prefill_s(tokens) * self.scale
