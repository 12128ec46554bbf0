"""Deploy a Serve config file (the same YAML ``serve run`` takes) from Python on a connected Ray."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema


# What ``deploy`` applies of an application; ``serve run`` / ``serve deploy`` apply the rest.
APPLIED_FIELDS = {"name", "route_prefix", "import_path", "args"}


def load_config(path: Path) -> ServeDeploySchema:
    """The validated Serve config of ``path``."""
    return ServeDeploySchema.model_validate(yaml.safe_load(Path(path).read_text()))


def deploy(path: Path, http_port: int | None = None, grpc_port: int | None = None,
           host: str | None = None) -> list[str]:
    """Start Serve with the file's proxy options (ports optionally overridden) and run each of
    its applications; returns the application names. Ray must already be initialised.

    Raises ValueError for an application field this does not apply (e.g. ``runtime_env``)
    rather than deploying without it."""
    config = load_config(path)
    for app in config.applications:
        if unapplied := sorted(app.model_fields_set - APPLIED_FIELDS):
            raise ValueError(f"application {app.name!r} sets {', '.join(unapplied)}, which only `serve run {path}` "
                             "or `serve deploy` apply")
    # A loaded machine can take longer than Serve's default 5 s to start a proxy.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    http = config.http_options.model_dump(exclude_unset=True)
    grpc = config.grpc_options.model_dump(exclude_unset=True)
    if http_port is not None:
        http["port"] = http_port
    if host is not None:
        http["host"] = host
    if grpc_port is not None:
        grpc["port"] = grpc_port
    serve.start(proxy_location=config.proxy_location, http_options=http, grpc_options=grpc)
    for app in config.applications:
        module, _, name = app.import_path.partition(":")
        builder = getattr(importlib.import_module(module), name)
        serve.run(builder(app.args), name=app.name, route_prefix=app.route_prefix, blocking=False)
    return [app.name for app in config.applications]
