"""Integration: the service on a real multi-node Ray cluster, workers on more than one node.

The cluster is two ``ray start --block`` processes on this machine (see ``ray_procs``): a
head with 1 CPU and a second node with 2 CPUs and a custom ``node_b`` resource, both with
token auth and this test's own token. The service runs as ``elastic-sgd serve`` with
``RAY_ADDRESS`` pointing at the head, exactly as in a deployment; a digits job with 4
workers (placed with Ray's SPREAD strategy by the coordinator) must train on both nodes
and succeed. Nothing here uses the session's Ray instance of ``conftest.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray_procs import (
    NODE_IP,
    RayNode,
    ServiceProcess,
    Stopwatch,
    cluster_nodes,
    free_port,
    head_args,
    job_state,
    new_token,
    ray_env,
    service_for,
    short_temp_dir,
    start_node,
    wait_for,
    worker_args,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

# 4 workers x 0.25 CPU + coordinator 0.25 = 1.25 CPUs of the cluster's 3; SPREAD puts
# workers on both nodes. 120 steps of digits take a few seconds once the workers are up.
SPEC: dict[str, Any] = {
    "name": "cluster-digits",
    "model": {"name": "mlp", "hidden": [32]},
    "dataset": {"name": "digits"},
    "workers": 4,
    "steps": 120,
    "batch_size": 32,
    "eval_interval": 40,
    "mode": {"name": "elastic", "beta": 0.5, "max_lag": 2},
}


@pytest.fixture(scope="module", autouse=True)
def ray_session() -> Iterator[None]:
    """Replaces the session-wide local Ray of ``conftest.py`` for this module: this test's
    Ray is its own cluster, in other processes, so this process starts none."""
    yield


def test_job_trains_across_two_nodes(tmp_path: Path) -> None:
    token = new_token()
    sw = Stopwatch()
    nodes: list[RayNode] = []
    service: ServiceProcess | None = None
    with short_temp_dir() as temp_dir:
        env = ray_env(token)
        try:
            port = free_port()
            address = f"{NODE_IP}:{port}"
            head = start_node("head", head_args(port, 1), temp_dir, env)
            nodes.append(head)
            head.wait_started()
            sw.lap("head up")
            # the second node and the service start together (the service only needs the head)
            node_b = start_node("node-b", worker_args(address, 2, {"node_b": 2}), temp_dir, env)
            nodes.append(node_b)
            service = service_for(tmp_path / "state", token, address)
            service.launch()
            node_b.wait_started()
            sw.lap("node_b up")
            service.wait_ready()
            sw.lap("service ready")
            with httpx.Client(base_url=service.url, timeout=30) as client:
                r = client.post("/jobs", json=SPEC)
                assert r.status_code == 201, r.text
                job_id = r.json()["id"]

                # the coordinator's status lists each worker with the node it runs on
                running = wait_for(
                    lambda: (
                        (j := job_state(client, job_id))["state"] in ("running", "succeeded")
                        and len([w for w in j["workers"] if w.get("node")]) == 4
                        and j
                    ),
                    90,
                    "4 placed workers",
                )
                worker_nodes = {w["node"] for w in running["workers"]}
                sw.lap("workers placed")
                done = wait_for(
                    lambda: (j := job_state(client, job_id))["terminal"] and j, 90, "the job's end"
                )
                assert done["state"] == "succeeded", (done, sw, service.log())
                sw.lap("job ended")
                alive = [n for n in cluster_nodes(address, env) if n["alive"]]
                sw.lap("nodes listed")
                assert done["summary"]["steps"] == SPEC["steps"]
                events = client.get(f"/jobs/{job_id}/events", params={"kind": "membership"})
                joined = [e["detail"] for e in events.json()["items"] if "joined" in e["detail"]]
        finally:
            if service is not None:
                service.stop()
            for node in reversed(nodes):
                node.stop()
            sw.lap("stopped")

    assert len(alive) == 2, alive
    b_ids = {n["id"] for n in alive if "node_b" in n["resources"]}
    all_ids = {n["id"] for n in alive}
    assert worker_nodes <= all_ids, (worker_nodes, all_ids)
    assert len(worker_nodes) >= 2, f"all 4 workers on one node: {running['workers']}"
    assert worker_nodes & b_ids, "no worker on node_b"
    # the membership events name the node of each worker too (first 8 hex digits)
    assert len(joined) >= 4, joined
    assert len({d.split("node ", 1)[1][:8] for d in joined}) >= 2, joined
