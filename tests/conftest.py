"""Shared fixtures: a real local Ray and a real multi-node Ray cluster on this machine (never a mock)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray with two CPUs for the module; ``recover`` with backend auto/ray uses it as is."""
    import ray

    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, namespace="ecdist", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster():
    """Head (no CPUs, so no pack lands there) + two worker nodes of one CPU each, connected."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="ecdist", log_to_driver=False)
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()
