"""Nothing outlives its job, and a job that cannot be placed says so — on the session's Ray.

* A job whose coordinator crashes over and over (``coordinator_crash`` faults, a checkpoint
  every 2 steps, ``max_coordinator_restarts: 100``) is cancelled through the job manager
  while Ray restarts the coordinator: the cancel answers in bounded time, the job ends
  ``cancelled``, and no actor of the job is left, its CPUs free again.
* ``JobRunner`` with a placement timeout, for a job needing more CPUs than this Ray has:
  it says at once what the job needs and what the cluster has, and fails after the timeout
  with that message, having created no actor.
* A worker that cannot be placed (the coordinator was) counts as failed to start, with the
  reason, after its share of the start timeout (half of it).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from integration_helpers import config

from core.errors import TrainingFailed
from core.names import NAMESPACE, coordinator_name, job_of_actor
from core.spec import parse_spec
from service.jobs import JobManager
from service.ray_conn import RayCluster
from service.runner import JobRunner
from service.settings import Settings
from service.store import Store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def actors_of(job_id: str) -> list[str]:
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == NAMESPACE and job_of_actor(a["name"]) == job_id
    ]


def restarting(actor: Any) -> bool:
    """Whether Ray is restarting ``actor`` now (its process is gone; not merely busy)."""
    try:
        ray.get(actor.ping.remote(), timeout=2.0)
    except (ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError):
        return True
    except ray.exceptions.GetTimeoutError:
        return False
    return False


def free_cpus() -> float:
    return float(ray.available_resources().get("CPU", 0.0))


def wait_for(cond: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[JobManager, Store]]:
    settings = Settings(
        state_dir=tmp_path / "state",
        data_dir=tmp_path / "data",
        poll_interval_s=0.2,
        start_timeout_s=60.0,
        cancel_timeout_s=3.0,
    )
    store = Store(settings.db_path)
    mgr = JobManager(settings, store)
    mgr.start(cluster=RayCluster())
    yield mgr, store
    mgr.stop()
    store.close()


def test_cancel_while_the_coordinator_restarts_leaves_nothing_behind(
    manager: tuple[JobManager, Store],
) -> None:
    mgr, store = manager
    cpus_before = free_cpus()
    spec = parse_spec(
        {
            "name": "crashing",
            # 100,000 generated rows: each restart of the coordinator takes seconds to load
            "dataset": {
                "name": "synthetic_classification",
                "n_samples": 100_000,
                "n_features": 100,
            },
            "model": {"name": "mlp", "hidden": [16]},
            "workers": 2,
            "steps": 100_000,
            "checkpoint": {"interval_steps": 2, "interval_s": None},
            "max_coordinator_restarts": 100,
            # a crash every few steps: the coordinator spends most of its time restarting
            "faults": [{"kind": "coordinator_crash", "at_step": s} for s in range(4, 400, 3)],
        }
    )
    job = mgr.submit(spec)
    assert wait_for(lambda: store.get_job(job.id).state != "pending", 30)  # type: ignore[union-attr]
    # the first crash comes within a second of training; by 8 s it has restarted a few times
    assert wait_for(lambda: len(actors_of(job.id)) >= 3, 60)
    time.sleep(8.0)
    # cancel at a moment the coordinator does not answer: Ray is restarting it
    coordinator = ray.get_actor(coordinator_name(job.id), namespace=NAMESPACE)
    assert wait_for(lambda: restarting(coordinator), 60)
    t0 = time.monotonic()
    row = mgr.cancel(job.id)
    took_s = time.monotonic() - t0
    # bounded: the graceful ask waits cancel_timeout_s (3 s), then the kill by name
    assert took_s < 15.0, took_s
    assert wait_for(lambda: store.get_job(job.id).state == "cancelled", 40), row  # type: ignore[union-attr]
    assert wait_for(lambda: actors_of(job.id) == [], 20), actors_of(job.id)
    # Ray frees a killed actor's CPUs once its process is gone
    assert wait_for(lambda: free_cpus() >= cpus_before - 1e-6, 30), (free_cpus(), cpus_before)
    time.sleep(3.0)  # nothing comes back (no restart of a killed coordinator)
    assert actors_of(job.id) == []
    ended = [e.detail for e in store.events(job.id) if e.kind == "state"][-1]
    print(f"cancel took {took_s:.1f} s; {ended}")


def test_a_job_that_cannot_be_placed_says_so_and_fails_after_the_timeout(tmp_path: Path) -> None:
    # 8 workers x 1 CPU + 0.25 for the coordinator: more than this Ray's 4 CPUs, ever
    spec = config(
        "digits_elastic.yaml",
        workers=8,
        max_workers=8,
        steps=10,
        resources={"worker_cpus": 1.0, "coordinator_cpus": 0.25},
    )
    told: list[tuple[float, str]] = []
    job_id = f"place-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    runner = JobRunner(
        job_id,
        spec,
        tmp_path / "out",
        detached=False,
        placement_timeout_s=4.0,
        on_wait=lambda msg: told.append((time.monotonic() - t0, msg)),
    )
    try:
        with pytest.raises(TrainingFailed) as ei:
            runner.start()
    finally:
        runner.release()
    took_s = time.monotonic() - t0
    assert len(told) == 1 and told[0][0] < 3.0, told  # said within seconds
    assert "CPU=8.25" in told[0][1] and "CPU=4" in told[0][1] and "in all" in told[0][1]
    assert 4.0 <= took_s < 15.0, took_s
    msg = str(ei.value)
    assert "cannot place job" in msg and "CPU=8.25" in msg and "waited 4 s" in msg
    assert actors_of(job_id) == []


def test_a_worker_that_cannot_be_placed_fails_to_start_with_the_reason(tmp_path: Path) -> None:
    # the coordinator (0.25) and one 3-CPU worker fit in 4 CPUs; the second worker never does
    spec = config(
        "digits_elastic.yaml",
        workers=2,
        max_workers=2,
        min_workers=2,
        steps=10,
        resources={"worker_cpus": 3.0, "coordinator_cpus": 0.25},
    )
    runner = JobRunner(
        f"unplaced-{uuid.uuid4().hex[:8]}",
        spec,
        tmp_path / "out",
        detached=False,
        start_timeout_s=30.0,  # a worker gets 0.5 x 30 = 15 s
    )
    t0 = time.monotonic()
    try:
        runner.start()
        took_s = time.monotonic() - t0
        p = runner.poll()
    finally:
        runner.release()
    assert 15.0 <= took_s < 30.0, took_s
    assert p.status["state"] == "failed"
    unplaced = [e.detail for e in p.events if "not placed within 15 s" in e.detail]
    assert unplaced and "CPU=3" in unplaced[0], [e.detail for e in p.events]
    assert actors_of(runner.job_id) == []
