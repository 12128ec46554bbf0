"""A request's serving stats as the APIs report them: latency, SLO, speculation."""

from __future__ import annotations

from specserve.deployments.protocol import RequestStats, SpeculationStats
from specserve.engine.request import RequestOutput
from specserve.spec.stats import SpecStats


def request_stats(output: RequestOutput) -> RequestStats:
    """One engine request's stats."""
    m = output.metrics
    ttft, tpot = m.ttft, m.tpot
    return RequestStats(
        ttft_ms=None if ttft is None else ttft * 1e3,
        tpot_ms=None if tpot is None else tpot * 1e3,
        e2e_ms=None if m.finished_time is None else (m.finished_time - m.arrival_time) * 1e3,
        tpot_slo_ms=output.slo.tpot_ms,
        ttft_slo_ms=output.slo.ttft_ms,
        slo_attained=output.slo.attained(ttft, tpot),
        speculation=_speculation_stats(output.spec_stats),
    )


def choices_stats(outputs: list[RequestOutput]) -> RequestStats:
    """The stats of a request's choices together: the last choice's first token and end, their
    mean TPOT, attained when every choice is, and their speculation summed."""
    if len(outputs) == 1:
        return request_stats(outputs[0])
    each = [request_stats(output) for output in outputs]
    spec = SpecStats()
    for output in outputs:
        if output.spec_stats is not None:
            spec.merge(output.spec_stats)
    tpots = [s.tpot_ms for s in each if s.tpot_ms is not None]
    return each[0].model_copy(update={
        "ttft_ms": None if any(s.ttft_ms is None for s in each) else max(s.ttft_ms for s in each),
        "tpot_ms": sum(tpots) / len(tpots) if tpots else None,
        "e2e_ms": None if any(s.e2e_ms is None for s in each) else max(s.e2e_ms for s in each),
        "slo_attained": all(s.slo_attained for s in each),
        "speculation": _speculation_stats(spec) if any(o.spec_stats is not None for o in outputs) else None,
    })


def _speculation_stats(spec: SpecStats | None) -> SpeculationStats | None:
    if spec is None:
        return None
    return SpeculationStats(steps=spec.steps, drafted=spec.drafted, verified=spec.verified,
                            accepted=spec.accepted, mean_accepted_tokens=spec.mean_accepted_tokens)
