"""The application builder that ``serve run`` and ``serve deploy`` import."""

from __future__ import annotations

from ray.serve import Application

from specserve.deployments.config import AppConfig, ServerConfig
from specserve.deployments.server import SpecServeServer


def build_app(args: AppConfig) -> Application:
    """One deployment of engine replicas, from the typed config (a Serve config's ``args``)."""
    config = AppConfig.model_validate(args)
    options: dict = {"ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus}}
    if config.autoscaling is not None:
        options["autoscaling_config"] = config.autoscaling.serve_config()
    else:
        options["num_replicas"] = config.num_replicas
    server = ServerConfig.model_validate(config.model_dump(include=set(ServerConfig.model_fields)))
    return SpecServeServer.options(**options).bind(server.model_dump())
