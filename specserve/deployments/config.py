"""Typed configuration of the Ray Serve application (the ``args`` of a Serve config file)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from specserve.config import EngineConfig


class ServerConfig(BaseModel):
    """What one engine replica runs."""

    model_config = ConfigDict(extra="forbid")

    engine: EngineConfig = Field(default_factory=EngineConfig)
    model_name: str | None = Field(
        default=None, description="Name clients use in `model`; None: the model directory's name."
    )
    max_waiting_requests: int = Field(
        default=64, ge=1, description="Queue length at which new requests get 429 with Retry-After."
    )
    metrics_interval_s: float = Field(default=1.0, gt=0, description="How often engine gauges are exported.")
    engine_process: bool = Field(
        default=True,
        description="Run the engine loop in a process of its own, so that serving's Python never takes the "
        "GIL from the forward (that process joins the replica's Ray cluster where the engine starts draft or "
        "tensor-parallel actors); False: in a thread of the replica.",
    )
    torch_threads: int | None = Field(
        default=None, ge=1,
        description="CPU threads of the replica's torch; None: every core of its node (Ray would "
        "otherwise limit a replica to its num_cpus threads).",
    )


class AutoscalingSettings(BaseModel):
    """Replica bounds and the SLO policy's thresholds (see ``SLOAutoscalingPolicy``)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=4, ge=1)
    waiting_per_replica: float = Field(default=4.0, gt=0)
    min_on_track: float = Field(default=0.9, ge=0, le=1)
    idle_kv_usage: float = Field(default=0.3, ge=0, le=1)
    upscale_delay_s: float = Field(default=5.0, ge=0)
    downscale_delay_s: float = Field(default=30.0, ge=0)
    metrics_interval_s: float = Field(default=1.0, gt=0)
    look_back_period_s: float = Field(default=5.0, gt=0)

    def serve_config(self) -> dict:
        """Ray Serve's ``autoscaling_config`` with the SLO policy."""
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "metrics_interval_s": self.metrics_interval_s,
            "look_back_period_s": self.look_back_period_s,
            "policy": {
                "policy_function": "specserve.deployments.autoscaling:SLOAutoscalingPolicy",
                "policy_kwargs": {
                    "waiting_per_replica": self.waiting_per_replica,
                    "min_on_track": self.min_on_track,
                    "idle_kv_usage": self.idle_kv_usage,
                },
            },
        }


class AppConfig(ServerConfig):
    """The whole application: a replica's config plus how many replicas and their resources."""

    num_replicas: int = Field(default=1, ge=1, description="Fixed replica count (without autoscaling).")
    autoscaling: AutoscalingSettings | None = Field(
        default=None, description="Scale replicas on SLO signals instead of a fixed count."
    )
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs Ray reserves per replica.")
    num_gpus: float = Field(
        default=0.0, ge=0,
        description="GPUs Ray reserves per replica process; with TP over Ray workers "
        "(engine.worker_backend 'ray') each further rank gets its own GPU in the replica's "
        "placement group.",
    )
