"""Integration: a job that waits in ``pending`` makes Ray's autoscaler add nodes, then runs.

The cluster is Ray's own autoscaling test cluster (:class:`ray.cluster_utils.
AutoscalingCluster`): a real autoscaler (``monitor.py`` on the head) over the fake multinode
provider, which "launches" a node by starting a raylet on this machine. Two things of the
upstream class do not fit here and are replaced in :class:`LocalAutoscalingCluster`:

* its base config is read from ``fake_multi_node/example.yaml``, which the pip wheel lacks:
  :data:`BASE_CONFIG` is that file's content (provider type ``fake_multinode``), given here;
* its ``start``/``shutdown`` run ``ray stop --force``, which kills every Ray instance on the
  machine: the head is started as a ``ray start --block`` process of this test instead
  (``ray_procs``), stopped by its pid and process group (the fake nodes are in it too).

The head has 1 CPU; the job asks for 0.5 (coordinator) + 2 x 1 (workers) CPUs. The service
(``elastic-sgd serve`` with ``RAY_ADDRESS``) keeps it pending and calls
``ray.autoscaler.sdk.request_resources`` with its bundles; the autoscaler adds two 1-CPU
worker nodes; the job is admitted, its workers run on the new nodes, and it succeeds.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray.cluster_utils import AutoscalingCluster
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
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

# python/ray/autoscaler/_private/fake_multi_node/example.yaml of the Ray repository (not in
# the wheel), without its example node types; AutoscalingCluster fills those in.
BASE_CONFIG: dict[str, Any] = {
    "cluster_name": "fake_multinode",
    "max_workers": 8,
    "provider": {
        "type": "fake_multinode",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    },
    "available_node_types": {},
    "head_node_type": "ray.head.default",
    "auth": {},
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.1,
    "docker": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
}
# The fake provider names the nodes it launches fffff...00001, fffff...00002, ...
FAKE_NODE_PREFIX = "f" * 51
# 256 MiB of object store per fake node (instead of 30% of the RAM).
FAKE_NODE_OBJECT_STORE_BYTES = 256 * 1024 * 1024

# coordinator 0.5 + 2 workers x 1 CPU = 2.5 CPUs: more than the head's 1, and each worker
# needs a whole fake node's CPU.
SPEC: dict[str, Any] = {
    "name": "autoscaled-digits",
    "model": {"name": "mlp", "hidden": [32]},
    "dataset": {"name": "digits"},
    "workers": 2,
    # ~6 s of training (50 ms per gradient): time for a worker that dies while starting on
    # a node just launched (seen once under the full suite's load) to be started again
    "steps": 120,
    "faults": [{"kind": "delay", "workers": [0, 1], "distribution": "constant", "delay_ms": 50}],
    "batch_size": 32,
    "eval_interval": 40,
    "mode": {"name": "sync"},
    "resources": {"worker_cpus": 1.0, "coordinator_cpus": 0.5},
}


class LocalAutoscalingCluster(AutoscalingCluster):
    """:class:`AutoscalingCluster` with its base config given here and a head that is a
    process of this test (no ``ray stop``; see the module docstring).

    Args:
        head_resources: the head's resources (``CPU`` becomes ``--num-cpus``).
        worker_node_types: autoscaler node types the cluster may add.
        temp_dir: Ray's temp dir for this cluster (short: socket paths live below it).
        env: environment of the head (token, ...); the fake nodes inherit it.
    """

    def __init__(
        self,
        head_resources: dict[str, float],
        worker_node_types: dict[str, Any],
        temp_dir: Path,
        env: dict[str, str],
    ) -> None:
        self.port = free_port()
        self.address = f"{NODE_IP}:{self.port}"
        self.temp_dir = temp_dir
        self.env = env
        self.head: RayNode | None = None
        super().__init__(head_resources, worker_node_types)

    def _generate_config(
        self,
        head_resources: dict[str, float],
        worker_node_types: dict[str, Any],
        autoscaler_v2: bool = False,  # noqa: ARG002 - the overridden method's signature
        **config_kwargs: Any,
    ) -> dict[str, Any]:
        config = copy.deepcopy(BASE_CONFIG)
        # the fake nodes join this head (the provider's default is <node ip>:6379)
        config["provider"]["gcs_address"] = self.address
        config["available_node_types"] = copy.deepcopy(worker_node_types)
        config["available_node_types"]["ray.head.default"] = {
            "resources": head_resources,
            "node_config": {},
            "max_workers": 0,
        }
        config.update(config_kwargs)
        return config

    def start(
        self,
        _system_config: dict[str, Any] | None = None,
        override_env: dict[str, str] | None = None,
    ) -> None:
        config_path = self.temp_dir / "autoscaling.json"
        config_path.write_text(json.dumps(self._config))
        env = {
            **self.env,
            # the autoscaler's loop runs every second instead of every 5
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_FAKE_CLUSTER": "1",
            **(override_env or {}),
        }
        cpus = float(self._head_resources.get("CPU", 0))
        extra = [f"--autoscaling-config={config_path}"]
        if _system_config is not None:
            extra.append(f"--system-config={json.dumps(_system_config, separators=(',', ':'))}")
        self.head = start_node("head", head_args(self.port, cpus, *extra), self.temp_dir, env)
        self.head.wait_started()

    def shutdown(self) -> None:
        if self.head is not None:
            self.head.stop()


@pytest.fixture(scope="module", autouse=True)
def ray_session() -> Iterator[None]:
    """Replaces the session-wide local Ray of ``conftest.py`` for this module: this test's
    Ray is its own cluster, in other processes, so this process starts none."""
    yield


def test_pending_job_gets_nodes_from_the_autoscaler(tmp_path: Path) -> None:
    token = new_token()
    sw = Stopwatch()
    service: ServiceProcess | None = None
    with short_temp_dir() as temp_dir:
        cluster = LocalAutoscalingCluster(
            head_resources={"CPU": 1},
            worker_node_types={
                "cpu_node": {
                    "resources": {"CPU": 1, "object_store_memory": FAKE_NODE_OBJECT_STORE_BYTES},
                    "node_config": {},
                    "min_workers": 0,
                    "max_workers": 2,
                }
            },
            temp_dir=temp_dir,
            env=ray_env(token),
        )
        try:
            cluster.start()
            sw.lap("head up")
            service = service_for(tmp_path / "state", token, cluster.address)
            service.start()
            sw.lap("service ready")
            with httpx.Client(base_url=service.url, timeout=30) as client:
                r = client.post("/jobs", json=SPEC)
                assert r.status_code == 201, r.text
                job_id = r.json()["id"]
                waiting = wait_for(
                    lambda: [
                        e
                        for e in client.get(f"/jobs/{job_id}/events").json()["items"]
                        if e["kind"] == "resources"
                    ],
                    30,
                    "the job to wait for resources",
                )
                assert job_state(client, job_id)["state"] in ("pending", "starting"), waiting
                print(f"event: {waiting[0]['detail']}")
                sw.lap("pending, autoscaler asked")
                wait_for(
                    lambda: job_state(client, job_id)["state"] != "pending",
                    120,
                    "the autoscaler's nodes (job leaves pending)",
                    interval_s=0.5,
                )
                sw.lap("admitted")
                seen: dict[str, Any] = {}

                def placed() -> dict[str, Any] | None:
                    seen.update(j := job_state(client, job_id))
                    on_nodes = [w for w in j["workers"] if w.get("node")]
                    ok = j["state"] in ("running", "succeeded") and len(on_nodes) == 2
                    return j if ok else None

                try:
                    running = wait_for(placed, 90, "2 placed workers")
                except AssertionError as exc:
                    tail = client.get(f"/jobs/{job_id}/events").json()["items"][-12:]
                    nodes = cluster_nodes(cluster.address, ray_env(token))
                    raise AssertionError(
                        f"{exc}\njob: {seen}\nevents: {tail}\nnodes: {nodes}\n"
                        f"service log: {service.log()}"
                    ) from None
                done = wait_for(
                    lambda: (j := job_state(client, job_id))["terminal"] and j, 90, "the job's end"
                )
                sw.lap("job ended")
                assert done["state"] == "succeeded", (done, sw, service.log())
                events = client.get(f"/jobs/{job_id}/events").json()["items"]
                nodes = cluster_nodes(cluster.address, ray_env(token))
        finally:
            if service is not None:
                service.stop()
            cluster.shutdown()
            sw.lap("stopped")

    states = [e["target"] for e in events if e["kind"] == "state" and e["source"] == "service"]
    # a job may end between two polls of the service, so "running" can be skipped there...
    assert states[:2] == ["pending", "starting"] and states[-1] == "succeeded", states
    # ...but never in the coordinator's own log
    ran = [e for e in events if e["kind"] == "state" and e["source"] == "runner"]
    assert any("-> running" in e["detail"] for e in ran), ran
    assert "asked the autoscaler" in waiting[0]["detail"], waiting
    added = {n["id"] for n in nodes if n["id"].startswith(FAKE_NODE_PREFIX)}
    assert len(added) >= 2, nodes  # the autoscaler launched two fake nodes
    worker_nodes = {w["node"] for w in running["workers"]}
    assert worker_nodes <= added and len(worker_nodes) == 2, (worker_nodes, nodes)
    print(f"stages: {sw}")
