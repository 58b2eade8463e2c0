"""kill -9 of a service that runs its own Ray (the embedded default): its jobs' coordinators
die with it, and the restarted service resumes each of them from its latest checkpoint.

(The other restart test, in ``test_service_e2e.py``, points the service at a Ray cluster
that outlives it, so the job is re-attached instead.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SMALL_SPEC, Server, e2e_server, job_in, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

# ~40 steps/s (a 25 ms delay on every gradient); a checkpoint every 40 steps
SPEC: dict[str, Any] = {
    **SMALL_SPEC,
    "name": "e2e-resume",
    "steps": 400,
    "checkpoint": {"interval_steps": 40},
    "faults": [{"kind": "delay", "delay_ms": 25.0}],
}


@pytest.fixture
def own_ray_server(tmp_path: Path) -> Iterator[Server]:
    srv = e2e_server(tmp_path / "state", ray_address=None)  # the service starts its own Ray
    srv.start(ready_timeout_s=180)
    yield srv
    srv.stop()


def test_kill_9_of_a_service_with_its_own_ray_resumes_from_the_checkpoint(
    own_ray_server: Server,
) -> None:
    srv = own_ray_server
    c = srv.client()
    r = c.post("/jobs", json=SPEC)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]

    def checkpointed() -> dict[str, Any] | None:
        j: dict[str, Any] = c.get(f"/jobs/{job_id}").json()
        assert not j["terminal"], j
        return j if j["checkpoints"] and j["step"] >= j["checkpoints"][-1]["step"] + 10 else None

    before = wait_for(checkpointed, 180, what="a checkpoint and 10 steps after it")
    before_m = c.get(f"/jobs/{job_id}/metrics", params={"limit": 10_000}).json()["items"]
    before_e = c.get(f"/jobs/{job_id}/events", params={"limit": 10_000}).json()["items"]

    srv.kill9()  # the API process only: its Ray (and the job's actors) go down with it
    with pytest.raises(httpx.TransportError):
        c.get("/healthz")
    srv.reap()  # what Ray left behind

    srv.start(ready_timeout_s=180)  # same state dir and port; a new Ray instance
    c = srv.client()
    events = c.get(f"/jobs/{job_id}/events", params={"limit": 10_000}).json()["items"]
    resumed = [e for e in events if e["kind"] == "resume"]
    assert len(resumed) == 1, events
    # the latest checkpoint the service had recorded, or one written after that poll
    ckpt = int(resumed[0]["detail"].split("checkpoint at step ")[1].split()[0])
    assert ckpt >= max(cp["step"] for cp in before["checkpoints"])
    assert c.get(f"/jobs/{job_id}").json()["state"] in ("recovering", "running")

    done = wait_for(
        lambda: job_in(c, job_id, {"succeeded", "failed", "cancelled"}),
        240,
        what="the resumed job to finish",
    )
    assert done["state"] == "succeeded", done
    assert done["step"] == SPEC["steps"]
    assert done["summary"]["final_test_accuracy"] > 0.8, done["summary"]
    # the coordinator went back to the checkpoint: one restart, the rest trained again
    restarts = [
        e
        for e in c.get(f"/jobs/{job_id}/events", params={"kind": "restart"}).json()["items"]
        if e["target"] == "coordinator"
    ]
    assert restarts and "steps lost" in restarts[-1]["detail"]
    # the service and the coordinator count the steps redone alike (both from the journal)
    said_service = re.search(r"\((\d+) steps trained after it", resumed[0]["detail"])
    said_coordinator = re.search(r"(\d+) steps lost", restarts[-1]["detail"])
    assert said_service and said_coordinator, (resumed[0]["detail"], restarts[-1]["detail"])
    said_service, said_coordinator = int(said_service[1]), int(said_coordinator[1])
    assert said_service == said_coordinator, (resumed[0]["detail"], restarts[-1]["detail"])
    after_m = c.get(f"/jobs/{job_id}/metrics", params={"limit": 10_000}).json()["items"]
    after_e = c.get(f"/jobs/{job_id}/events", params={"limit": 10_000}).json()["items"]
    # nothing recorded before the kill is lost
    assert {m["seq"] for m in before_m} <= {m["seq"] for m in after_m}
    assert {e["id"] for e in before_e} <= {e["id"] for e in after_e}
    # every step has its record; the ones after the checkpoint were trained twice
    steps = {m["step"] for m in after_m if m["kind"] == "step"}
    assert steps == set(range(1, SPEC["steps"] + 1))
    states = [e["target"] for e in after_e if e["kind"] == "state" and e["source"] == "service"]
    assert states[-3:] == ["recovering", "running", "succeeded"], states


def _gcs_pids(service_pid: int) -> list[int]:
    """The gcs_server processes the service's embedded Ray started (its children)."""
    out = subprocess.run(
        ["pgrep", "-P", str(service_pid), "-f", "gcs_server"], capture_output=True, text=True
    ).stdout
    return [int(p) for p in out.split()]


def test_a_killed_gcs_is_survived_the_job_resumes_on_a_new_ray(own_ray_server: Server) -> None:
    """Ray lost, service stays: SIGKILL of the embedded Ray's GCS while a job trains. The
    service does not exit; /readyz says not ready meanwhile; the job is ``recovering``,
    then ``running``, then ``succeeded``, and the service and the coordinator count the
    steps redone alike."""
    srv = own_ray_server
    assert srv.proc is not None
    c = srv.client()
    r = c.post("/jobs", json=SPEC)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]

    def checkpointed() -> dict[str, Any] | None:
        j: dict[str, Any] = c.get(f"/jobs/{job_id}").json()
        assert not j["terminal"], j
        return j if j["checkpoints"] and j["step"] >= j["checkpoints"][-1]["step"] + 10 else None

    wait_for(checkpointed, 180, what="a checkpoint and 10 steps after it")
    gcs = _gcs_pids(srv.proc.pid)
    assert len(gcs) == 1, gcs
    os.kill(gcs[0], signal.SIGKILL)
    wait_for(
        lambda: c.get("/readyz").status_code == 503 or None, 30, what="/readyz to say not ready"
    )
    done = wait_for(
        lambda: job_in(c, job_id, {"succeeded", "failed", "cancelled"}),
        300,
        what="the job to finish on the new Ray",
    )
    assert srv.proc.poll() is None, "the service exited"
    assert c.get("/readyz").status_code == 200
    assert done["state"] == "succeeded", done
    assert _gcs_pids(srv.proc.pid) not in ([], gcs)  # a new GCS
    events = c.get(f"/jobs/{job_id}/events", params={"limit": 10_000}).json()["items"]
    assert [e for e in events if e["kind"] == "ray"], events
    states = [e["target"] for e in events if e["kind"] == "state" and e["source"] == "service"]
    assert states[-3:] == ["recovering", "running", "succeeded"], states
    (resumed,) = [e for e in events if e["kind"] == "resume"]
    restarts = [e for e in events if e["kind"] == "restart" and e["target"] == "coordinator"]
    said_service = re.search(r"\((\d+) steps trained after it", resumed["detail"])
    said_coordinator = re.search(r"(\d+) steps lost", restarts[-1]["detail"]) if restarts else None
    assert said_service and said_coordinator, (resumed, restarts)
    assert int(said_service[1]) == int(said_coordinator[1])
    steps = {
        m["step"]
        for m in c.get(f"/jobs/{job_id}/metrics", params={"limit": 10_000}).json()["items"]
        if m["kind"] == "step"
    }
    assert steps == set(range(1, SPEC["steps"] + 1))
