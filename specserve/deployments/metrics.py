"""Prometheus metrics of a serving replica, exported through Ray's metrics agent.

Ray prefixes every name with ``ray_`` and adds the deployment and replica as tags; scrape the
nodes' metrics ports (Ray writes them to ``/tmp/ray/prom_metrics_service_discovery.json``).
"""

from __future__ import annotations

from ray.serve import metrics

from specserve.deployments.stats import request_stats
from specserve.engine.llm_engine import EngineLoad
from specserve.engine.request import RequestOutput
from specserve.spec.stats import SpecStats

_LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 3, 6, 12, 25, 50, 100]


class ServingMetrics:
    """Per-request histograms and counters, and engine gauges refreshed by ``refresh``."""

    def __init__(self, model_name: str) -> None:
        tags = {"model": model_name}  # copied per metric: Serve adds its own tags to the dict

        def histogram(name: str, description: str) -> metrics.Histogram:
            h = metrics.Histogram(name, description, boundaries=_LATENCY_BUCKETS_S, tag_keys=("model",))
            h.set_default_tags(dict(tags))
            return h

        def gauge(name: str, description: str) -> metrics.Gauge:
            g = metrics.Gauge(name, description, tag_keys=("model",))
            g.set_default_tags(dict(tags))
            return g

        self.ttft = histogram("specserve_ttft_seconds", "Time to first token.")
        self.tpot = histogram("specserve_tpot_seconds", "Mean time per output token of a request.")
        self.e2e = histogram("specserve_e2e_seconds", "Request latency from arrival to the last token.")
        self.requests = metrics.Counter(
            "specserve_requests_total", "Ended requests by outcome (finish reason, or abort) and SLO attainment.",
            tag_keys=("model", "finish_reason", "slo_attained"),
        )
        self.requests.set_default_tags(dict(tags))
        self.tokens = metrics.Counter("specserve_generated_tokens_total", "Output tokens.", tag_keys=("model",))
        self.tokens.set_default_tags(dict(tags))
        self.waiting = gauge("specserve_waiting_requests", "Requests waiting for a KV slot.")
        self.running = gauge("specserve_running_requests", "Requests holding a KV slot.")
        self.kv_usage = gauge("specserve_kv_usage", "Share of KV slots in use.")
        self.on_track = gauge("specserve_on_track", "Share of unfinished requests that can still meet their SLO.")
        self.acceptance = gauge("specserve_acceptance_rate", "Accepted over verified drafted tokens.")
        self.speculation_length = gauge(
            "specserve_speculation_length", "Drafted tokens verified per speculative step (mean)."
        )
        self.mean_accepted = gauge(
            "specserve_mean_accepted_tokens", "Tokens emitted per verification step (MAT)."
        )

    def request_done(self, output: RequestOutput, outcome: str) -> None:
        """Record a request that ended: finished, failed, or aborted by its client."""
        stats = request_stats(output)
        if stats.ttft_ms is not None:
            self.ttft.observe(stats.ttft_ms / 1e3)
        if stats.tpot_ms is not None:
            self.tpot.observe(stats.tpot_ms / 1e3)
        if stats.e2e_ms is not None:
            self.e2e.observe(stats.e2e_ms / 1e3)
        attained = output.finished and stats.slo_attained
        self.requests.inc(tags={"finish_reason": outcome, "slo_attained": str(attained).lower()})
        if output.output.token_ids:  # Ray's counters refuse an increment of 0
            self.tokens.inc(len(output.output.token_ids))

    def refresh(self, load: EngineLoad, spec: SpecStats) -> None:
        self.waiting.set(load.waiting)
        self.running.set(load.running)
        self.kv_usage.set(load.kv_usage)
        self.on_track.set(load.on_track)
        if spec.steps:
            self.acceptance.set(spec.accepted / max(spec.verified, 1))
            self.speculation_length.set(spec.verified / spec.steps)
            self.mean_accepted.set(spec.mean_accepted_tokens)
