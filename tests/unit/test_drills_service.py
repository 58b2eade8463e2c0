"""Drills through the service (POST /drills) with a fake runner: the same analysis, report
and plot as the local runner, read back from the store; GET /drills/{id}/plot.png."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_runner import FakeBackend, FakeCluster, Script
from fastapi.testclient import TestClient

from api.main import create_app
from service.jobs import JobManager
from service.settings import Settings
from service.store import Store

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

JOB: dict[str, Any] = {"name": "drill-job", "steps": 6, "workers": 2}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[TestClient, Store]]:
    settings = Settings(
        state_dir=tmp_path / "state", data_dir=tmp_path / "data", poll_interval_s=0.02
    )
    store = Store(settings.db_path)
    mgr = JobManager(settings, store, backend=FakeBackend(Script(steps_per_poll=2)))
    app = create_app(settings, manager=mgr, cluster=FakeCluster(4.0), connect_ray=False)
    with TestClient(app) as c:
        yield c, store


def finished(c: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    r = c.post("/drills", json=body)
    assert r.status_code == 202, r.text
    d: dict[str, Any] = r.json()
    deadline = time.monotonic() + 20
    while d["state"] == "running" and time.monotonic() < deadline:
        # not before its end: the drill exists, its state forbids the plot (the drill may
        # have ended since the last read: then the plot is there)
        assert c.get(f"/drills/{d['id']}/plot.png").status_code in (409, 200)
        time.sleep(0.05)
        d = c.get(f"/drills/{d['id']}").json()
    assert d["state"] != "running", "the drill never ended"
    return d


def test_a_service_drill_gets_the_full_report_and_a_plot(
    client: tuple[TestClient, Store],
) -> None:
    c, store = client
    d = finished(c, {"name": "ok", "job": JOB, "criteria": {"min_test_accuracy": 0.9}})
    assert d["state"] == "passed", d
    assert [ch["name"] for ch in d["report"]["checks"]] == [
        "finished",
        "min_test_accuracy",
        "faults_recorded",
    ]
    stored = store.get_drill(d["id"])
    assert stored is not None and stored.report is not None
    # the local runner's report: coverage, recoveries, events and the records' time span
    assert {"faults", "recoveries", "events", "train_time_s", "restarts"} <= set(stored.report)
    job = store.get_job(d["job_id"])
    assert job is not None
    folder = Path(job.out_dir)
    assert json.loads((folder / "report.json").read_text())["passed"] is True
    assert "# Drill `ok`: PASSED" in (folder / "report.md").read_text()
    png = c.get(f"/drills/{d['id']}/plot.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content[:4] == b"\x89PNG" and png.content == (folder / "report.png").read_bytes()
    assert c.get("/drills/nope/plot.png").status_code == 404


def test_a_service_drill_checks_coverage_from_the_stored_events(
    client: tuple[TestClient, Store],
) -> None:
    # the fake runner fires no fault: a planned crash without its FAULT event fails the drill
    faults = [{"kind": "crash", "workers": [0], "at_step": 2}]
    d = finished(c := client[0], {"name": "crash", "job": {**JOB, "faults": faults}})
    assert d["state"] == "failed", d
    (check,) = [ch for ch in d["report"]["checks"] if ch["passed"] is False]
    assert check["name"] == "faults_recorded" and "#0 crash on worker-0" in check["detail"]
    assert c.get(f"/drills/{d['id']}/plot.png").status_code == 200
