"""The application builder that ``serve run`` and ``serve deploy`` import."""

from __future__ import annotations

from ray.serve import Application

from specserve.deployments.config import AppConfig, ServerConfig
from specserve.deployments.server import SpecServeServer


def build_app(args: AppConfig) -> Application:
    """One deployment of engine replicas, from the typed config (a Serve config's ``args``)."""
    config = AppConfig.model_validate(args)
    options: dict = {"ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus}}
    engine = config.engine
    if engine.tensor_parallel_size > 1 and engine.worker_backend == "ray":
        # The replica (rank 0) and its TP worker actors share one node: bundle r is rank r's.
        rank0 = {"CPU": config.num_cpus, "GPU": config.num_gpus}
        worker = {"CPU": 1, "GPU": 1 if config.num_gpus > 0 else 0}  # a GPU model puts every rank on one
        options["placement_group_bundles"] = [rank0] + [worker] * (engine.tensor_parallel_size - 1)
        options["placement_group_strategy"] = "STRICT_PACK"
    if config.autoscaling is not None:
        options["autoscaling_config"] = config.autoscaling.serve_config()
    else:
        options["num_replicas"] = config.num_replicas
    server = ServerConfig.model_validate(config.model_dump(include=set(ServerConfig.model_fields)))
    return SpecServeServer.options(**options).bind(server.model_dump())
