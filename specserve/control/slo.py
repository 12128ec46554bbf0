"""Per-request latency objectives and the named classes that give their defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SLO(BaseModel):
    """Latency targets of one request; None leaves that metric unconstrained."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tpot_ms: float | None = Field(default=None, gt=0, description="Mean time per output token.")
    ttft_ms: float | None = Field(default=None, gt=0, description="Time to the first token.")

    def attained(self, ttft_s: float | None, tpot_s: float | None) -> bool:
        """Whether a finished request with this TTFT and mean TPOT (seconds) met the SLO."""
        return self.ttft_attained(ttft_s) and self.tpot_attained(tpot_s)

    def ttft_attained(self, ttft_s: float | None) -> bool:
        """Whether a first token after ``ttft_s`` (None: never) met the TTFT target."""
        return self.ttft_ms is None or (ttft_s is not None and ttft_s * 1e3 <= self.ttft_ms)

    def tpot_attained(self, tpot_s: float | None) -> bool:
        """Whether a mean TPOT of ``tpot_s`` (None: one token only) met the TPOT target."""
        return self.tpot_ms is None or tpot_s is None or tpot_s * 1e3 <= self.tpot_ms


def _default_classes() -> dict[str, SLO]:
    # Sized for the default model on a laptop CPU, where plain decoding takes ~30 ms per token
    # alone and ~100 ms per token beside 15 others.
    return {
        "interactive": SLO(tpot_ms=60, ttft_ms=1500),
        "chat": SLO(tpot_ms=120, ttft_ms=4000),
        "batch": SLO(tpot_ms=400, ttft_ms=30000),
    }


class SLOConfig(BaseModel):
    """Named SLO classes, the class of requests that name none, and what to do with the hopeless."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    classes: dict[str, SLO] = Field(default_factory=_default_classes)
    default_class: str = "chat"
    on_miss: Literal["best_effort", "reject"] = Field(
        default="best_effort",
        description="A waiting request that can no longer meet its TTFT SLO: serve it anyway, "
        "or finish it at once with a clear reason so the client can retry elsewhere.",
    )

    @model_validator(mode="after")
    def _default_class_exists(self) -> SLOConfig:
        if self.default_class not in self.classes:
            raise ValueError(f"default_class {self.default_class!r} is not one of {sorted(self.classes)}")
        return self

    def scaled(self, factor: float) -> SLOConfig:
        """These classes with every target multiplied by ``factor`` (for a slower or faster machine)."""
        if factor <= 0:
            raise ValueError(f"an SLO scale must be positive, got {factor}")
        classes = {
            name: SLO(
                tpot_ms=None if c.tpot_ms is None else c.tpot_ms * factor,
                ttft_ms=None if c.ttft_ms is None else c.ttft_ms * factor,
            )
            for name, c in self.classes.items()
        }
        return self.model_copy(update={"classes": classes})

    def resolve(self, slo_class: str | None, tpot_ms: float | None, ttft_ms: float | None) -> SLO:
        """A request's SLO: its explicit targets over its class's (or the default class's)."""
        name = slo_class or self.default_class
        if name not in self.classes:
            raise ValueError(f"unknown SLO class {name!r}; known: {sorted(self.classes)}")
        base = self.classes[name]
        return SLO(
            tpot_ms=tpot_ms if tpot_ms is not None else base.tpot_ms,
            ttft_ms=ttft_ms if ttft_ms is not None else base.ttft_ms,
        )
