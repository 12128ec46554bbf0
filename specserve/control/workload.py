"""Workloads for comparing policies: trace arrivals, SLO mixes, and the metrics of a run.

Shared by the simulator and the replay benchmark, so both read the trace and score a run the
same way: a request attains its SLO when its TTFT and mean TPOT are within its targets; goodput
is the output tokens per second of the requests that attain.
"""

from __future__ import annotations

import csv
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from specserve.control.slo import SLO

@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # since the trace's first request
    prompt_tokens: int
    output_tokens: int


def read_trace(path: Path, limit: int | None = None) -> list[TraceRequest]:
    """The Azure LLM inference trace (TIMESTAMP, ContextTokens, GeneratedTokens), in order."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            stamp = datetime.fromisoformat(row["TIMESTAMP"].strip()[:26])
            rows.append((stamp, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"trace {path} has no requests")
    rows.sort(key=lambda r: r[0])
    start = rows[0][0]
    return [TraceRequest((t - start).total_seconds(), p, g) for t, p, g in rows]


def scale_trace(
    trace: list[TraceRequest], rate: float, max_prompt: int, max_output: int
) -> list[TraceRequest]:
    """Arrivals compressed or stretched to ``rate`` requests/s on average; lengths scaled down
    proportionally to fit ``max_prompt`` / ``max_output`` (the trace's shape, a smaller size)."""
    span = trace[-1].arrival_s - trace[0].arrival_s
    factor = (len(trace) - 1) / span / rate if span > 0 and len(trace) > 1 else 1.0
    prompt_scale = max_prompt / max(r.prompt_tokens for r in trace)
    output_scale = max_output / max(r.output_tokens for r in trace)
    return [
        TraceRequest(
            (r.arrival_s - trace[0].arrival_s) * factor,
            max(1, round(r.prompt_tokens * prompt_scale)),
            max(1, round(r.output_tokens * output_scale)),
        )
        for r in trace
    ]


def assign_slo_classes(count: int, mix: dict[str, float], seed: int) -> list[str]:
    """A class name per request, drawn with the weights of ``mix``."""
    rng = random.Random(seed)
    names = sorted(mix)
    return rng.choices(names, weights=[mix[n] for n in names], k=count)


@dataclass
class Outcome:
    """What one finished request achieved."""

    slo: SLO
    ttft_s: float | None
    tpot_s: float | None
    output_tokens: int
    verify_steps: int = 0  # decode steps (each verifies a tree or decodes one token)
    rejected: bool = False

    @property
    def attained(self) -> bool:
        return not self.rejected and self.slo.attained(self.ttft_s, self.tpot_s)


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else (values[0] if values else 0.0)


def _share(outcomes: list[Outcome], test: Callable[[Outcome], bool]) -> float:
    return sum(map(test, outcomes)) / len(outcomes) if outcomes else 0.0


def summarize(outcomes: list[Outcome], duration_s: float) -> dict[str, float]:
    """SLO attainment (both targets, and each alone), goodput, TTFT / TPOT (mean and p99, ms)
    and MAT of one run."""
    served = [o for o in outcomes if not o.rejected]
    ttfts = [o.ttft_s * 1e3 for o in served if o.ttft_s is not None]
    tpots = [o.tpot_s * 1e3 for o in served if o.tpot_s is not None]
    steps = sum(o.verify_steps for o in served)
    decoded = sum(o.output_tokens - 1 for o in served if o.verify_steps)
    return {
        "requests": len(outcomes),
        "slo_attainment": _share(outcomes, lambda o: o.attained),
        "ttft_attainment": _share(outcomes, lambda o: not o.rejected and o.slo.ttft_attained(o.ttft_s)),
        "tpot_attainment": _share(outcomes, lambda o: not o.rejected and o.slo.tpot_attained(o.tpot_s)),
        "goodput_tok_s": sum(o.output_tokens for o in outcomes if o.attained) / duration_s,
        "throughput_tok_s": sum(o.output_tokens for o in served) / duration_s,
        "mean_ttft_ms": statistics.fmean(ttfts) if ttfts else 0.0,
        "p99_ttft_ms": _p99(ttfts),
        "mean_tpot_ms": statistics.fmean(tpots) if tpots else 0.0,
        "p99_tpot_ms": _p99(tpots),
        "mat": decoded / steps if steps else 1.0,
        "rejected": sum(o.rejected for o in outcomes),
    }
