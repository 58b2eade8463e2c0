"""History in one request and cheap streams, over HTTP, without Ray.

The app runs with the fake runner backend (as in test_api_http.py). Streams that must stay
open while others are made (the cap, the shared reader) need a real server: the app is
served by uvicorn on loopback in a thread of this process, and driven with httpx.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fake_runner import FakeBackend, FakeCluster
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.main import create_app
from bench.service_process import free_port
from core.events import StepRecord
from service.jobs import JobManager
from service.settings import Settings
from service.store import Store

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

SPEC: dict[str, Any] = {"name": "hist", "steps": 6, "workers": 2}


class CountingStore(Store):
    """The real store, counting reads of new metric records (the streams' polling)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.metric_reads = 0

    def metrics(self, job_id: str, **kw: Any) -> list[dict[str, Any]]:
        self.metric_reads += 1
        return super().metrics(job_id, **kw)


def make_app(tmp_path: Path, **settings: Any) -> FastAPI:
    s = Settings(
        state_dir=tmp_path / "state", data_dir=tmp_path / "data", poll_interval_s=0.02, **settings
    )
    backend = FakeBackend()
    mgr = JobManager(s, CountingStore(s.db_path), backend=backend)
    return create_app(s, manager=mgr, cluster=FakeCluster(4.0, backend=backend), connect_ray=False)


def sse(text: str) -> list[tuple[str, str | None, Any]]:
    """(event, id, data) of each message of an SSE body; a ``metrics`` message gives a
    ("metric", the cursor after it, record) each, as the SDK hands them out."""
    out = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, _, value = line.partition(": ")
            fields[key] = value
        if fields.get("event") == "metrics":  # a record each, with the cursor after it
            after_id = fields["id"].split(":")[1]
            out.extend(("metric", f"{r['seq']}:{after_id}", r) for r in json.loads(fields["data"]))
        elif "event" in fields:
            out.append((fields["event"], fields.get("id"), json.loads(fields["data"])))
    return out


def wait_done(c: TestClient, job_id: str) -> None:
    deadline = time.monotonic() + 10
    while c.get(f"/jobs/{job_id}").json()["state"] != "succeeded":
        assert time.monotonic() < deadline, "the fake job never finished"
        time.sleep(0.02)


def long_run(store: Store, job_id: str, first_seq: int, steps: int) -> None:
    """More step records for a finished job, through the service's own write path."""
    store.ingest(
        job_id,
        [
            StepRecord(first_seq + i, 7 + i, 0.0, 1e9, 1.0, 1.0, 0, 0.1, 0.2, 1.0, 2)
            for i in range(steps)
        ],
        [],
    )


def test_history_in_one_request_then_the_stream_has_only_what_is_new(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    with TestClient(app) as c:
        job = c.post("/jobs", json=SPEC).json()
        wait_done(c, job["id"])
        whole = c.get(f"/jobs/{job['id']}/history").json()
        assert [m["step"] for m in whole["steps"]["items"]] == [1, 2, 3, 4, 5, 6]
        assert not whole["steps"]["thinned"] and len(whole["evals"]["items"]) >= 1
        assert [e["target"] for e in whole["events"] if e["kind"] == "state"][-1] == "succeeded"
        long_run(app.state.store, job["id"], whole["last_seq"] + 1, 5_000)
        h = c.get(f"/jobs/{job['id']}/history", params={"max_points": 100, "events": 2}).json()
        steps = h["steps"]["items"]
        assert h["steps"]["thinned"] and 50 <= len(steps) <= 100
        assert steps[0]["step"] == 1 and steps[-1]["step"] == 5_006
        assert h["last_seq"] == whole["last_seq"] + 5_000 == steps[-1]["seq"]
        assert len(h["events"]) == 2 and h["last_event_id"] == whole["last_event_id"]
        # the stream goes on from there: nothing more for a finished job but its end
        params = {"after_seq": h["last_seq"], "after_id": h["last_event_id"]}
        with c.stream("GET", f"/jobs/{job['id']}/stream", params=params) as r:
            got = sse("".join(r.iter_text()))
        assert [k for k, _, _ in got] == ["job", "end"]
        for bad in ({"max_points": 1}, {"max_points": 20_001}, {"events": -1}):
            r = c.get(f"/jobs/{job['id']}/history", params=bad)
            assert r.status_code == 422, (bad, r.text)
        assert c.get("/jobs/nope/history").status_code == 404


def test_last_event_id_resumes_after_the_cursor_it_names(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    with TestClient(app) as c:
        job = c.post("/jobs", json=SPEC).json()
        wait_done(c, job["id"])
        url = f"/jobs/{job['id']}/stream"
        with c.stream("GET", url) as r:
            first = sse("".join(r.iter_text()))
        sent = [(k, i, d) for k, i, d in first if k in ("metric", "event")]
        assert all(i is not None for _, i, _ in sent)
        cut = sent[4][1]  # as if the connection broke after the fifth
        assert cut is not None
        # Last-Event-ID wins over after_seq (a browser reconnects with the URL it had)
        with c.stream("GET", url, params={"after_seq": -1}, headers={"Last-Event-ID": cut}) as r:
            again = sse("".join(r.iter_text()))
        assert again[0][0] == "job" and again[-1][0] == "end"
        resumed = [(k, i, d) for k, i, d in again if k in ("metric", "event")]
        assert resumed == sent[5:]
        r = c.get(url, headers={"Last-Event-ID": "m12"})
        assert r.status_code == 422 and "last-event-id" in r.text.lower()


@contextmanager
def served(app: FastAPI) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port, in a thread of this process."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


class Follower:
    """Reads an open stream's lines. One iterator for the response's life: dropping an
    ``iter_lines()`` part-way closes the connection."""

    def __init__(self, r: httpx.Response) -> None:
        assert r.status_code == 200, r.read()
        self.lines = r.iter_lines()

    def next_event(self) -> str:
        for line in self.lines:
            if line.startswith("event:"):
                return line.split(":", 1)[1].strip()
        raise AssertionError("the stream ended without a message")


def test_past_max_stream_subscribers_a_stream_is_429_and_a_closed_one_frees_its_place(
    tmp_path: Path,
) -> None:
    # max_running_jobs=0: the job pends for ever, so its streams stay open
    app = make_app(tmp_path, max_stream_subscribers=2, max_running_jobs=0)
    with served(app) as url, httpx.Client(base_url=url, timeout=10) as c:
        job_id = c.post("/jobs", json=SPEC).json()["id"]
        path = f"/jobs/{job_id}/stream"
        with c.stream("GET", path) as one, c.stream("GET", path) as two:
            followers = [Follower(one), Follower(two)]
            assert [f.next_event() for f in followers] == ["job", "job"]
            assert len(app.state.streams.feeds()) == 1  # one reader for both
            refused = c.get(path)
            assert refused.status_code == 429
            assert "max_stream_subscribers allows (2)" in refused.json()["detail"]
            assert refused.headers["retry-after"] == "5"
            assert c.get(f"/jobs/{job_id}").status_code == 200  # the rest is unaffected
        deadline = time.monotonic() + 10
        while app.state.streams.open:  # the server sees both streams closed
            assert time.monotonic() < deadline, "the closed streams kept their places"
            time.sleep(0.02)
        with c.stream("GET", path) as three:
            assert Follower(three).next_event() == "job"


def test_streams_of_one_job_share_one_reader_of_the_store(tmp_path: Path) -> None:
    app = make_app(tmp_path, max_running_jobs=0)
    store: CountingStore = app.state.store
    n = 8
    with served(app) as url, httpx.Client(base_url=url, timeout=10) as c:
        job_id = c.post("/jobs", json=SPEC).json()["id"]
        path = f"/jobs/{job_id}/stream"
        streams = [c.stream("GET", path) for _ in range(n)]
        responses = [s.__enter__() for s in streams]
        try:
            followers = [Follower(r) for r in responses]
            assert [f.next_event() for f in followers] == ["job"] * n
            assert app.state.streams.open == n and len(app.state.streams.feeds()) == 1
            reads, t0 = store.metric_reads, time.monotonic()
            time.sleep(1.0)
            reads, elapsed = store.metric_reads - reads, time.monotonic() - t0
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    polls = elapsed / 0.02  # one read per poll interval for the one feed
    # a reader per stream would make n x polls reads (the supervisor reads none)
    assert 0.2 * polls <= reads <= 1.5 * polls, (reads, polls)
