"""Drill: the loss of a whole Ray node that hosts workers (``configs/drills/node_loss.yaml``).

It needs a multi-node cluster, i.e. its own Ray instance, while the other integration tests
share the session's single-node one (``conftest.py``). So the test runs this module as a
script in a subprocess: :func:`main` builds a :class:`ray.cluster_utils.Cluster` on this
machine (a head with 2 CPUs for the driver and the coordinator, plus a worker node with 2
CPUs and a custom resource that marks it) under a private Ray temp dir, runs the drill's job
with :class:`~service.runner.JobRunner`, removes the worker node once the job reaches step
~50 and some of its workers live there, lets the job finish, and writes the drill report
with :func:`~service.drills.run.write_report`. The test then reads the report.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRILL = ROOT / "configs" / "drills" / "node_loss.yaml"
# Cluster start-up (two raylets) + four workers + training, on a shared 2-core machine.
TIMEOUT_S = 300
# Marks the node that will be removed (any name no other resource uses).
DOOMED = "esgd_doomed_node"

pytestmark = pytest.mark.integration


def main(out: Path) -> int:
    """Run the node-loss drill on a fresh two-node cluster; write ``out/report.json``."""
    import ray
    from ray.cluster_utils import Cluster

    from service import ray_conn
    from service.drills.analyse import ExternalFault
    from service.drills.run import write_report
    from service.drills.spec import load_drill
    from service.runner import JobRunner

    drill = load_drill(DRILL)
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False}
    )
    node = cluster.add_node(num_cpus=2, resources={DOOMED: 1.0})
    cluster.wait_for_nodes()
    ray_conn.connect(cluster.address)
    runner = JobRunner(f"nodeloss-{uuid.uuid4().hex[:8]}", drill.job, out, detached=False)
    removed: dict[str, Any] = {}
    summary: dict[str, Any] | None = None
    error = None
    try:
        runner.start()
        deadline = time.monotonic() + TIMEOUT_S - 60
        while not removed:
            if time.monotonic() > deadline:
                raise TimeoutError("the job never reached step 50 with a worker on the node")
            st = runner.poll().status
            on_node = [
                w
                for w in st["workers"]
                if w["node"] == node.node_id and w["state"] not in ("starting", "dead", "left")
            ]
            if st["step"] >= 50 and on_node:
                removed = {
                    "node_removed": node.node_id,
                    "workers_on_node": sorted(f"worker-{w['id']}" for w in on_node),
                    "step": st["step"],
                    "wall_time": time.time(),
                }
                cluster.remove_node(node, allow_graceful=False)
            else:
                time.sleep(0.05)
        while not runner.done():
            if time.monotonic() > deadline:
                raise TimeoutError("the job did not finish after the node was removed")
            runner.poll()
            time.sleep(0.1)
        summary = runner.finish()
    except Exception as exc:  # noqa: BLE001 - reported, then the test fails on it
        error = f"{type(exc).__name__}: {exc}"
    finally:
        if runner.actor is not None:
            with contextlib.suppress(Exception):
                runner.cancel()
            runner.release()
        ray.shutdown()
        cluster.shutdown()
    external = [
        ExternalFault(
            wall_time=removed["wall_time"],
            target=target,
            detail=f"its node {node.node_id[:8]} removed from the cluster",
        )
        for target in removed.get("workers_on_node", [])
    ]
    report = write_report(
        drill, out, summary, error=error, external=external, extra={"node_removal": removed}
    )
    return 0 if report["passed"] else 1


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_node_loss(tmp_path: Path) -> None:
    """Workers on a removed node are noticed and replaced; the job still reaches 0.95."""
    # A private Ray temp dir: Cluster writes its address to <temp>/ray/ray_current_cluster,
    # where a bare ray.init() of any other process on this machine would find and join it
    # (and removes that file at shutdown). Short: Ray's socket paths live under it.
    ray_tmp = tempfile.mkdtemp(prefix="esgd-nl-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    try:
        proc = subprocess.run(
            [sys.executable, __file__, str(tmp_path)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    report_file = tmp_path / "report.json"
    assert report_file.exists(), f"no report; stderr:\n{proc.stderr[-4000:]}"
    report = json.loads(report_file.read_text())
    failed = [c for c in report["checks"] if c["passed"] is False]
    assert report["passed"], f"{failed} {report['error']}\n{proc.stderr[-2000:]}"
    assert proc.returncode == 0
    s = report["summary"]
    assert s["final_test_accuracy"] >= 0.95
    assert s["consistency"]["b_hat_max"] <= s["consistency"]["bound"]
    removed = report["node_removal"]
    lost = removed["workers_on_node"]
    assert lost, "no worker ran on the removed node"
    for target in lost:
        detects = [
            e
            for e in report["events"]
            if e["kind"] == "detect"
            and e["target"] == target
            and e["wall_time"] >= removed["wall_time"]
        ]
        assert detects, f"{target} on the removed node was never detected as lost"
        # actor death, or the heartbeat deadline at the latest (+ a margin for a busy box)
        assert detects[0]["wall_time"] - removed["wall_time"] <= 5.0 + 10.0
        (loss,) = [w for w in report["recoveries"]["workers"] if w["worker"] == target]
        assert loss["fault"] == "external" and loss["cause"].startswith("its node")
        assert loss["replacement_started"], f"{target} was not replaced"
    assert s["state"] == "succeeded" and s["steps"] == s["total_steps"]


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
