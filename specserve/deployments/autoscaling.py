"""Scale engine replicas on SLO signals instead of request counts.

Every replica reports its load (``record_autoscaling_stats``): waiting requests, KV use, and the
share of its requests still on track for their SLO. The policy adds replicas when requests queue
or fall behind their SLO, and removes one when the replicas are mostly idle. Ray Serve applies
the deployment's ``upscale_delay_s`` / ``downscale_delay_s`` and replica bounds around it.
"""

from __future__ import annotations

import math
from typing import Any

from ray.serve.config import AutoscalingContext

# Names of the stats each replica reports.
WAITING, KV_USAGE, ON_TRACK = "waiting", "kv_usage", "on_track"


class SLOAutoscalingPolicy:
    """Desired replicas from the replicas' SLO signals.

    Scale up (in proportion) when the mean waiting requests per replica exceed
    ``waiting_per_replica`` or fewer than ``min_on_track`` of requests can still meet their SLO;
    scale down by one when nothing waits, KV use is below ``idle_kv_usage`` and everyone is on track.
    """

    def __init__(
        self,
        waiting_per_replica: float = 4.0,
        min_on_track: float = 0.9,
        idle_kv_usage: float = 0.3,
    ) -> None:
        self.waiting_per_replica = waiting_per_replica
        self.min_on_track = min_on_track
        self.idle_kv_usage = idle_kv_usage

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        current = ctx.current_num_replicas
        metrics = ctx.aggregated_metrics or {}
        if current == 0 or not metrics.get(WAITING):
            # Nothing reported yet (or scaled to zero): let traffic decide, as the default does.
            return (1 if ctx.total_num_requests > 0 else current), {}
        desired = self.desired(
            current,
            waiting=sum(metrics[WAITING].values()),
            kv_usage=_mean(metrics.get(KV_USAGE, {}).values(), 0.0),
            on_track=_mean(metrics.get(ON_TRACK, {}).values(), 1.0),
        )
        return desired, {}

    def desired(self, current: int, waiting: float, kv_usage: float, on_track: float) -> int:
        """The replica count these signals ask for (bounds and delays are applied by Serve)."""
        queue_need = math.ceil(waiting / self.waiting_per_replica) if waiting > 0 else 0
        if queue_need > current or on_track < self.min_on_track:
            return max(current + 1, min(queue_need, 2 * current))
        if waiting == 0 and kv_usage < self.idle_kv_usage and on_track >= self.min_on_track:
            return max(current - 1, 1)
        return current


def _mean(values, default: float) -> float:
    values = list(values)
    return sum(values) / len(values) if values else default
