"""Cluster deployment: the manifests are valid and deploy the repo's config, and replicas spread
over the nodes of a multi-node cluster (``ray.cluster_utils.Cluster``)."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402
from ray.util.state import list_actors  # noqa: E402

from specserve.deployments.app import build_app  # noqa: E402
from specserve.deployments.config import AppConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_kuberay_service_deploys_the_autoscaling_config():
    manifest = yaml.safe_load((REPO / "cluster" / "kuberay-rayservice.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve_config == yaml.safe_load((REPO / "configs" / "autoscaling.yaml").read_text())
    for app in ServeDeploySchema.model_validate(serve_config).applications:
        AppConfig.model_validate(app.args)
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "specserve:latest"
    assert all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in cluster["workerGroupSpecs"])


def test_cluster_launcher_yaml_matches_rays_schema():
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    config = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    assert config["head_node_type"] in config["available_node_types"]


def _complete(port: int, prefix: str, prompt: str) -> dict:
    body = json.dumps({"prompt": prompt, "max_tokens": 8, "temperature": 0}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{prefix}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())


def test_replicas_and_a_draft_actor_spread_over_the_nodes_of_a_multi_node_cluster(tiny_model):
    """A head without CPUs and three one-CPU workers: two one-CPU replicas must land on two of
    them and requests reach both through the head's proxy; a third app's engine process starts
    its one-CPU draft actor on the last free worker, and its greedy answers equal the others'."""
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(3)]
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": 18100})
        engine = {"model": str(tiny_model), "max_num_seqs": 2, "max_model_len": 256}
        serve.run(build_app({"engine": engine, "num_replicas": 2, "num_cpus": 1, "torch_threads": 1}),
                  name="specserve", route_prefix="/")
        speculative = {"method": "draft", "draft_model": str(tiny_model), "draft_placement": "actor",
                       "draft_num_cpus": 1}
        drafting = {**engine, "speculative": speculative, "control": {"policy": "fixed"}}
        serve.run(build_app({"engine": drafting, "num_cpus": 0, "torch_threads": 1}),
                  name="drafted", route_prefix="/drafted")
        actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
        replica_nodes = {a.node_id for a in actors if a.class_name.startswith("ServeReplica:specserve")}
        assert len(replica_nodes) == 2 and replica_nodes < {w.node_id for w in workers}
        for _ in range(4):
            assert _complete(18100, "", "Hello")["usage"]["completion_tokens"] == 8
        drafted = _complete(18100, "/drafted", "Hello")
        assert drafted["choices"][0]["text"] == _complete(18100, "", "Hello")["choices"][0]["text"]
        assert drafted["specserve"]["speculation"]["accepted"] > 0  # the target drafting for itself
        actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
        draft_nodes = [a.node_id for a in actors if a.class_name == "DraftWorker"]
        assert draft_nodes == [w.node_id for w in workers if w.node_id not in replica_nodes]
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
