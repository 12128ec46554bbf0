"""A multi-node Ray cluster on this machine (head + workers as separate raylets), serving a
SpecServe config until interrupted: the same application a real cluster runs.

    python cluster/local_cluster.py [--config configs/default.yaml] [--workers 2] [--cpus-per-node 1]

Each node is a separate raylet with its own resources, so Serve places replicas and proxies
across nodes as it would on separate machines.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from specserve.deployments.launch import deploy

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--workers", type=int, default=2, help="worker nodes besides the head")
    parser.add_argument("--cpus-per-node", type=float, default=1)
    args = parser.parse_args()
    if not args.config.is_file():
        parser.error(f"{args.config} not found")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus_per_node})
    for _ in range(args.workers):
        cluster.add_node(num_cpus=args.cpus_per_node)
    ray.init(address=cluster.address)
    print(f"Ray cluster with {len(ray.nodes())} nodes at {cluster.address}")
    apps = deploy(args.config)
    print(f"serving {apps} from {args.config}; Ctrl-C stops the cluster")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
