"""Per-request sampling parameters, validated on construction."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from specserve.spec.tree import TreeBudget


class StructuredOutput(BaseModel):
    """What the output must match: exactly one of a JSON schema, any JSON object, a regular
    expression, one of given strings, or a Lark grammar (llguidance's dialect)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    json_schema: dict | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = Field(default=None, min_length=1)
    grammar: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutput:
        given = [self.json_schema is not None, self.json_object, self.regex is not None,
                 self.choice is not None, self.grammar is not None]
        if sum(given) != 1:
            raise ValueError("give exactly one of json_schema, json_object, regex, choice, grammar")
        return self


class SamplingParams(BaseModel):
    """How to pick each next token and when to stop (OpenAI / vLLM semantics).

    ``temperature == 0`` is greedy decoding. ``top_k == 0`` disables top-k.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(
        default=16, ge=0, description="The most tokens to generate; 0 only scores the prompt (see prompt_logprobs)."
    )
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1, description="A 64-bit integer.")
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    presence_penalty: float = Field(
        default=0.0, ge=-2.0, le=2.0, description="Subtracted from the logit of every token already generated."
    )
    frequency_penalty: float = Field(
        default=0.0, ge=-2.0, le=2.0, description="Subtracted from a token's logit once per time it was generated."
    )
    repetition_penalty: float = Field(
        default=1.0, gt=0.0, le=10.0,
        description="vLLM's: every token of the prompt or the output has its logit divided by it "
        "(multiplied where negative); 1 is none.",
    )
    logit_bias: dict[int, float] = Field(
        default_factory=dict,
        description="Token id -> value added to its logit before the token is chosen (-100 bans "
        "it, 100 all but forces it); speculative verification adds it too, so it stays lossless.",
    )
    structured: StructuredOutput | None = Field(
        default=None,
        description="Constrain the output (JSON schema, JSON object, regex, choice or grammar): only "
        "tokens that keep it matchable are chosen, and it ends when complete; speculative "
        "verification applies the same constraint, so it stays lossless.",
    )
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    speculation: TreeBudget | None = Field(
        default=None,
        description="This request's token-tree budget when the engine speculates; None: the "
        "engine's default. depth=0 decodes it without speculation.",
    )
    slo_class: str | None = Field(
        default=None, description="Named SLO class of the engine's config; None: its default class."
    )
    tpot_slo_ms: float | None = Field(default=None, gt=0, description="Overrides the class's TPOT target.")
    ttft_slo_ms: float | None = Field(default=None, gt=0, description="Overrides the class's TTFT target.")
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=20,
        description="Return the log-probabilities (of the model's raw distribution) of each "
        "output token and of this many most likely alternatives.",
    )
    prompt_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=20,
        description="Return the log-probability of each prompt token after the first (given the "
        "tokens before it) and of this many most likely alternatives (vLLM's prompt_logprobs).",
    )
    output_kind: Literal["cumulative", "final_only"] = Field(
        default="cumulative",
        description="'cumulative': an output at every step the request advances (everything so "
        "far plus what is new); 'final_only': only its last output, for callers that wait for the "
        "whole answer (offline batches, non-streaming requests), which spares the engine the rest.",
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: str | list[str] | None) -> list[str]:
        if value is None:
            return []
        values = [value] if isinstance(value, str) else list(value)
        if any(not s for s in values):
            raise ValueError("stop strings must be non-empty")
        return values

    @field_validator("logit_bias")
    @classmethod
    def _bias_in_range(cls, value: dict[int, float]) -> dict[int, float]:
        if any(token < 0 for token in value) or any(not -100 <= bias <= 100 for bias in value.values()):
            raise ValueError("logit_bias maps token ids (>= 0) to values in [-100, 100]")
        return value

    @property
    def penalized(self) -> bool:
        """Whether the tokens this request chooses depend on the ones it generated before."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether its logits are biased, penalized or constrained before a token is chosen."""
        return bool(self.logit_bias) or self.penalized or self.structured is not None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
