"""HTTP behaviour without Ray: status codes, error bodies, auth, limits, schemas.

The app runs with a fake runner backend (``connect_ray=False``), so this checks the API's
own logic only; tests/e2e does the same against a real server and real Ray.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_runner import FakeBackend, FakeCluster, Script
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.main import create_app
from core.errors import SpecError
from core.spec import parse_spec
from service import ray_conn
from service.jobs import JobManager
from service.settings import Settings
from service.store import Store

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPEC: dict[str, Any] = {"name": "api", "steps": 6, "workers": 2, "max_workers": 3}


def make_app(
    tmp_path: Path,
    *,
    token: str | None = None,
    script: Script | None = None,
    cpus: float = 4.0,
    max_body: int = 1 << 20,
) -> tuple[FastAPI, FakeBackend]:
    settings = Settings(
        state_dir=tmp_path / "state",
        data_dir=tmp_path / "data",
        token=token,
        poll_interval_s=0.02,
        max_body_bytes=max_body,
    )
    backend = FakeBackend(script)
    mgr = JobManager(settings, Store(settings.db_path), backend=backend)
    app = create_app(
        settings, manager=mgr, cluster=FakeCluster(cpus, backend=backend), connect_ray=False
    )
    return app, backend


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    app, _ = make_app(tmp_path)
    with TestClient(app) as c:
        yield c


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[TestClient]:
    app, _ = make_app(tmp_path, token=TOKEN, script=Script(steps_per_poll=1))
    with TestClient(app) as c:
        yield c


def wait_state(c: TestClient, job_id: str, states: set[str], timeout_s: float = 10) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        j = c.get(f"/jobs/{job_id}").json()
        if j["state"] in states:
            return j
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {states}")


def test_submit_follow_and_read_history(client: TestClient) -> None:
    r = client.post("/jobs", json=SPEC)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "pending" and job["spec"]["name"] == "api"
    done = wait_state(client, job["id"], {"succeeded"})
    assert done["progress"] == 1.0 and done["summary"]["final_test_accuracy"] == 0.97
    m = client.get(f"/jobs/{job['id']}/metrics").json()
    assert [x["step"] for x in m["items"] if x["kind"] == "step"] == [1, 2, 3, 4, 5, 6]
    later = client.get(f"/jobs/{job['id']}/metrics", params={"since_step": 5}).json()
    assert {x["step"] for x in later["items"]} == {5, 6}
    newer = client.get(f"/jobs/{job['id']}/metrics", params={"after_seq": m["last_seq"]}).json()
    assert newer["items"] == [] and newer["last_seq"] == m["last_seq"]
    ev = client.get(f"/jobs/{job['id']}/events").json()
    assert [e["target"] for e in ev["items"] if e["kind"] == "state"] == [
        "pending",
        "starting",
        "running",
        "succeeded",
    ]
    listing = client.get("/jobs", params={"state": ["succeeded"]}).json()
    assert listing["total"] == 1 and listing["items"][0]["id"] == job["id"]
    assert client.get("/jobs", params={"state": ["failed"]}).json()["total"] == 0
    model = client.get(f"/jobs/{job['id']}/model")
    assert model.status_code == 200 and model.content.startswith(b"fake-model-")
    assert model.headers["content-type"] == "application/octet-stream"


def test_sse_stream_replays_history_then_ends(client: TestClient) -> None:
    job = client.post("/jobs", json=SPEC).json()
    wait_state(client, job["id"], {"succeeded"})
    with client.stream("GET", f"/jobs/{job['id']}/stream") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    lines = text.splitlines()
    kinds = [line.split(":", 1)[1].strip() for line in lines if line.startswith("event:")]
    assert kinds[0] == "job" and kinds[-1] == "end" and "event" in kinds
    # the history's records in one 'metrics' message (an array)
    assert kinds.count("metrics") == 1
    data = [line.split(":", 1)[1] for line in lines if line.startswith("data:")]
    assert len(json.loads(data[kinds.index("metrics")])) == 9


def test_bad_spec_is_422_with_the_cli_paths_and_messages(client: TestClient) -> None:
    bad = {**SPEC, "mode": {"name": "elastic", "beta": 99}, "batch_size": 0, "colour": "red"}
    r = client.post("/jobs", json=bad)
    assert r.status_code == 422
    body = r.json()
    got = {(e["path"], e["message"]) for e in body["errors"]}
    with pytest.raises(SpecError) as ei:
        parse_spec(bad)
    assert got == set(ei.value.problems)  # same wording as `elastic-sgd submit`
    paths = {p for p, _ in got}
    assert {"batch_size", "colour"} <= paths
    beta = next(p for p in paths if p.startswith("mode.") and p.endswith(".beta"))
    assert beta in body["detail"]


@pytest.mark.parametrize(
    ("body", "path_part"),
    [
        ({**SPEC, "steps": "many"}, "steps"),
        ({**SPEC, "steps": 10**30}, "steps"),
        ({**SPEC, "optimizer": {"lr": 1e300}}, "optimizer.lr"),
        ({**SPEC, "dataset": {"name": "npz", "path": "../../etc/passwd.npz"}}, "dataset"),
        ({**SPEC, "dataset": {"name": "npz", "path": "/etc/x.npz"}}, "dataset"),
        ({**SPEC, "dataset": {"name": "imagenet"}}, "dataset.name"),
        ({**SPEC, "model": {"name": "gpt"}}, "model.name"),
        ({**SPEC, "name": "../../x"}, "name"),
        ([1, 2, 3], "body"),
        ("just a string", "body"),
    ],
)
def test_malformed_specs_are_refused_clearly(client: TestClient, body: Any, path_part: str) -> None:
    r = client.post("/jobs", json=body)
    assert r.status_code == 422, r.text
    errs = r.json()["errors"]
    assert errs and any(e["path"].startswith(path_part) for e in errs), errs
    assert all(e["message"] for e in errs)


@pytest.mark.parametrize(
    "raw", [b'{"steps": 1e999}', b'{"steps": NaN}', b'{"steps": 5, "optimizer": {"lr": -Infinity}}']
)
def test_non_finite_numbers_are_422(client: TestClient, raw: bytes) -> None:
    r = client.post("/jobs", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["errors"]


def test_missing_npz_file_is_422(client: TestClient) -> None:
    r = client.post("/jobs", json={**SPEC, "dataset": {"name": "npz", "path": "x.npz"}})
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "dataset.path"


def test_malformed_json_and_missing_body(client: TestClient) -> None:
    r = client.post("/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]
    r = client.post("/jobs")
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "body"


def test_unknown_ids_are_404_everywhere(client: TestClient) -> None:
    for method, path in [
        ("GET", "/jobs/abc"),
        ("GET", "/jobs/abc/metrics"),
        ("GET", "/jobs/abc/events"),
        ("GET", "/jobs/abc/stream"),
        ("GET", "/jobs/abc/model"),
        ("POST", "/jobs/abc/cancel"),
        ("GET", "/drills/abc"),
        ("GET", "/jobs/..%2F..%2Fetc"),
    ]:
        r = client.request(method, path)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["detail"]
    r = client.post("/jobs/abc/scale", json={"workers": 2})
    assert r.status_code == 404 and "GET /jobs" in r.json()["detail"]


def test_state_conflicts_are_409(client: TestClient) -> None:
    job = client.post("/jobs", json=SPEC).json()
    wait_state(client, job["id"], {"succeeded"})
    for path, body in [
        ("scale", {"workers": 2}),
        ("faults", {"kind": "crash", "workers": [0]}),
        ("cancel", None),
    ]:
        r = client.post(f"/jobs/{job['id']}/{path}", json=body)
        assert r.status_code == 409, (path, r.text)
        assert "succeeded" in r.json()["detail"]


def test_scale_beyond_max_workers_is_422(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, script=Script(steps_per_poll=1))
    with TestClient(app) as c:
        job = c.post("/jobs", json={**SPEC, "steps": 100_000}).json()
        wait_state(c, job["id"], {"running"})
        r = c.post(f"/jobs/{job['id']}/scale", json={"workers": 9})
        assert r.status_code == 422 and "max_workers (3)" in r.json()["errors"][0]["message"]
        assert c.post(f"/jobs/{job['id']}/scale", json={"workers": 3}).status_code == 202
        r = c.post(f"/jobs/{job['id']}/faults", json={"kind": "crash", "workers": [1]})
        assert r.status_code == 202
        assert c.post(f"/jobs/{job['id']}/cancel").status_code == 202
        wait_state(c, job["id"], {"cancelled"})


def test_token_guards_mutating_routes_only(secured: TestClient) -> None:
    r = secured.post("/jobs", json=SPEC)
    assert r.status_code == 401 and "ESGD_TOKEN" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"
    r = secured.post("/jobs", json=SPEC, headers={"Authorization": "Bearer wrong-token-xyz"})
    assert r.status_code == 403
    r = secured.post("/jobs", json=SPEC, headers={"Authorization": f"Basic {TOKEN}"})
    assert r.status_code == 401
    # auth is checked before the body: a bad body without a token is still 401
    assert secured.post("/jobs", json={"colour": 1}).status_code == 401
    job = secured.post("/jobs", json=SPEC, headers=AUTH)
    assert job.status_code == 201
    jid = job.json()["id"]
    for path in ("cancel", "scale", "faults"):
        assert secured.post(f"/jobs/{jid}/{path}", json={}).status_code == 401
    assert secured.post("/drills", json={}).status_code == 401
    # reads stay open
    assert secured.get("/jobs").status_code == 200
    assert secured.get(f"/jobs/{jid}").status_code == 200
    assert secured.get("/metrics").status_code == 200


def test_oversized_bodies_are_413(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, max_body=2048)
    with TestClient(app) as c:
        big = {**SPEC, "name": "x" * 4000}
        r = c.post("/jobs", json=big)
        assert r.status_code == 413 and "ESGD_MAX_BODY_BYTES" in r.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
            yield b'{"name": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}'

        r = c.post("/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413


def test_unknown_route_and_method_are_clean_json(client: TestClient) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and "/docs" in r.json()["detail"]
    r = client.delete("/jobs")
    assert r.status_code == 405 and "not allowed" in r.json()["detail"]


def test_bugs_are_a_clean_500(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals 1234")

    # raise_server_exceptions: the test client raises what the app raised further; the bug
    # is answered and not raised again (a server would close the connection of a request
    # that raised), so the next request is served as usual
    with TestClient(app, raise_server_exceptions=True) as c:
        r = c.get("/boom")
        assert c.get("/healthz").status_code == 200
    assert r.status_code == 500 and "bug in elastic-sgd" in r.json()["detail"]
    assert "secret internals" not in r.text  # no internals leak
    assert "server-timing" in r.headers  # timed like any answer


@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": 10**6}, {"offset": -1}, {"state": "sleeping"}, {"limit": "ten"}],
)
def test_bad_query_parameters_are_422(client: TestClient, params: dict[str, Any]) -> None:
    r = client.get("/jobs", params=params)
    assert r.status_code == 422 and r.json()["errors"][0]["path"].startswith("query.")


def test_drill_runs_and_reports(client: TestClient) -> None:
    drill = {
        "name": "d1",
        "job": {**SPEC, "faults": [{"kind": "crash", "workers": [0], "at_step": 2}]},
        "criteria": {"min_test_accuracy": 0.9, "faults_recorded": False},
    }
    r = client.post("/drills", json=drill)
    assert r.status_code == 202, r.text
    d = r.json()
    assert d["state"] == "running" and d["job_id"]
    deadline = time.monotonic() + 10
    while d["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
        d = client.get(f"/drills/{d['id']}").json()
    assert d["state"] == "passed", d
    assert {c["name"] for c in d["report"]["checks"]} == {"finished", "min_test_accuracy"}
    bad = client.post("/drills", json={"name": "d2", "job": {"steps": 0}})
    assert bad.status_code == 422 and bad.json()["errors"][0]["path"] == "job.steps"


def test_health_ready_and_prometheus(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    # no Ray in this test (even when an earlier test module of this pytest run started one):
    # not ready, and says why
    monkeypatch.setattr(ray_conn, "is_connected", lambda: False)
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["ray"] is False and "ray" in r.json()["detail"]
    monkeypatch.undo()
    job = client.post("/jobs", json=SPEC).json()
    wait_state(client, job["id"], {"succeeded"})
    text = client.get("/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    jobs = {s.labels["state"]: s.value for s in fams["esgd_jobs"].samples}
    assert jobs["succeeded"] == 1.0 and jobs["running"] == 0.0
    assert {"esgd_faults", "esgd_recoveries", "esgd_job_step", "esgd_job_b_hat_max"} <= set(fams)


def test_dashboard_and_openapi(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "elastic-sgd" in r.text
    assert client.get("/static/app.js").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/stream", "/drills", "/metrics"} <= set(
        schema["paths"]
    )
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_request_timing_header_and_histogram(client: TestClient) -> None:
    job = client.post("/jobs", json=SPEC)
    assert job.status_code == 201
    got = client.get(f"/jobs/{job.json()['id']}")
    missing = client.get("/jobs/nope")
    for r in (job, got, missing):
        name, _, dur = r.headers["server-timing"].partition(";dur=")
        assert name == "app" and 0.0 <= float(dur) < 60_000
    fams = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    counts = {
        (s.labels["method"], s.labels["route"], s.labels["status"]): s.value
        for s in fams["esgd_http_request_duration_seconds"].samples
        if s.name.endswith("_count")
    }
    # labelled by the route's template, not by the id in the path
    assert counts[("POST", "/jobs", "201")] == 1.0
    assert counts[("GET", "/jobs/{job_id}", "200")] == 1.0
    assert counts[("GET", "/jobs/{job_id}", "404")] == 1.0


def test_the_event_loop_lag_is_measured_and_served(client: TestClient) -> None:
    """A handler that blocks the loop for 0.3 s shows up as one timer fired that late."""
    time.sleep(0.2)  # the watch ticks meanwhile (the app's loop runs in its own thread)

    def counts() -> dict[str, float]:
        fams = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
        return {
            s.labels.get("le", s.name): s.value
            for s in fams["esgd_event_loop_lag_seconds"].samples
            if s.name.endswith(("_bucket", "_count"))
        }

    before = counts()
    assert before["esgd_event_loop_lag_seconds_count"] >= 2  # ticking every 50 ms
    client.portal.call(_block_loop, 0.3)  # type: ignore[union-attr]
    time.sleep(0.1)  # the late timer fires and is recorded
    after = counts()
    # one more observation above 0.25 s: the bucket le=0.25 did not get it, le=0.5 did
    late = (after["+Inf"] - after["0.25"]) - (before["+Inf"] - before["0.25"])
    assert late >= 1, (before, after)


async def _block_loop(seconds: float) -> None:
    time.sleep(seconds)  # a blocking call on the loop: what the watch is there to see


def test_job_detail_is_cached_per_version_with_an_etag(client: TestClient) -> None:
    job = client.post("/jobs", json=SPEC).json()
    done = wait_state(client, job["id"], {"succeeded"})
    first = client.get(f"/jobs/{job['id']}")
    etag = first.headers["etag"]
    assert first.json() == done and first.json()["checkpoints"] == done["checkpoints"]
    again = client.get(f"/jobs/{job['id']}")
    assert again.headers["etag"] == etag and again.content == first.content
    unchanged = client.get(f"/jobs/{job['id']}", headers={"If-None-Match": etag})
    assert unchanged.status_code == 304 and unchanged.headers["etag"] == etag
    assert client.get(f"/jobs/{job['id']}", headers={"If-None-Match": '"x"'}).status_code == 200
    # a change of the row is a new version: cancelling a pending job shows at once
    # 16 x 0.25 CPU + 0.25 is more than the fake cluster's 2 CPUs (and within the budgets)
    pending = client.post("/jobs", json={**SPEC, "workers": 16, "max_workers": 16}).json()
    tag = client.get(f"/jobs/{pending['id']}").headers["etag"]
    assert client.post(f"/jobs/{pending['id']}/cancel").status_code == 202
    after = client.get(f"/jobs/{pending['id']}", headers={"If-None-Match": tag})
    assert after.status_code == 200 and after.json()["state"] == "cancelled"
    assert after.headers["etag"] != tag


# -- hostile input: a 4xx that says what to change, never a 500 --------------------------------


def test_the_token_is_checked_before_the_body_is_parsed(secured: TestClient) -> None:
    bad_json = {"content-type": "application/json"}
    for path in ("/jobs", "/jobs/abc/scale", "/jobs/abc/faults", "/drills"):
        r = secured.post(path, content=b"{not json", headers=bad_json)
        assert r.status_code == 401, (path, r.text)
        r = secured.post(
            path, content=b"{not json", headers={**bad_json, "Authorization": "Bearer nope-nope"}
        )
        assert r.status_code == 403, (path, r.text)
    # with the token, the body is parsed and refused on its own merits
    r = secured.post("/jobs", content=b"{not json", headers={**bad_json, **AUTH})
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]


def test_error_lists_are_capped_at_50_with_a_count(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, max_body=4 << 20)
    body = {**SPEC, **{f"unknown_{i}": i for i in range(60_000)}}
    with TestClient(app) as c:
        r = c.post("/jobs", json=body)
    assert r.status_code == 422
    err = r.json()
    assert len(err["errors"]) == 50 and err["errors_omitted"] == 60_000 - 50
    assert err["errors"][0]["message"].startswith("unknown field")
    assert "(and 59995 more)" in err["detail"]
    assert len(r.content) < 20_000  # was 4.7 MB


def _npz_problem(c: TestClient, path: str) -> str:
    r = c.post("/jobs", json={**SPEC, "dataset": {"name": "npz", "path": path}})
    assert r.status_code == 422, r.text
    (problem,) = r.json()["errors"]
    assert problem["path"] == "dataset.path"
    return str(problem["message"])


def test_filesystem_errors_on_dataset_path_are_422_on_the_field(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "loop.npz").symlink_to(data / "loop.npz")
    (data / "a").symlink_to(data / "b")
    (data / "b").symlink_to(data / "a")
    with TestClient(app) as c:
        assert "symlink loop" in _npz_problem(c, "loop.npz")
        assert "symlink loop" in _npz_problem(c, "a/x.npz")
        assert "NUL byte" in _npz_problem(c, "bad\x00name.npz")
        # 120 two-byte characters: 240 bytes, fine; 250 three-byte ones: 750 > 255
        assert "File name too long" in _npz_problem(c, "€" * 250 + ".npz")
        assert "ESGD_DATA_DIR" in _npz_problem(c, "dir/" + "x" * 240 + ".npz")
        # the client is still served after each (a 500 would have closed the connection)
        assert c.get("/jobs").status_code == 200


def test_huge_numbers_in_a_spec_are_422_with_the_bound(client: TestClient) -> None:
    r = client.post("/jobs", json={**SPEC, "faults": [{"kind": "drop", "steps": [10**30]}]})
    assert r.status_code == 422
    (problem,) = r.json()["errors"]
    assert problem["path"] == "faults.0.steps.0" and "<= 100000000" in problem["message"]


def test_a_failed_job_says_why_and_the_full_text_is_behind_the_token(tmp_path: Path) -> None:
    from ray_exception_objects import constructor_failed

    tb_error = constructor_failed(FileNotFoundError(2, "No such file", "/srv/secret/x.npz"))
    app, _ = make_app(tmp_path, token=TOKEN, script=Script(start_error=tb_error))
    with TestClient(app) as c:
        jid = c.post("/jobs", json=SPEC, headers=AUTH).json()["id"]
        job = wait_state(c, jid, {"failed"})
        public = job["error"]
        assert public.startswith("could not start: ") and "FileNotFoundError" in public
        for leak in ("\x1b[", "/srv/secret", "pid=", "10.0.0.7", "Traceback", 'File "'):
            assert leak not in public, (leak, public)
        assert c.get(f"/jobs/{jid}/error").status_code == 401
        full = c.get(f"/jobs/{jid}/error", headers=AUTH)
        assert full.status_code == 200, full.text
        body = full.json()
        assert body["error"] == public and body["state"] == "failed"
        assert "/srv/secret/x.npz" in body["detail"] and "Traceback" in body["detail"]
        assert c.get("/jobs/abc/error", headers=AUTH).status_code == 404


def test_a_job_failed_without_a_reason_still_has_one(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, script=Script(end="failed", error=None))
    with TestClient(app) as c:
        jid = c.post("/jobs", json=SPEC).json()["id"]
        job = wait_state(c, jid, {"failed"})
        assert job["error"] not in (None, "", "None")
        assert "GET /jobs/{id}/error" in job["error"]
        assert c.get(f"/jobs/{jid}/error").json()["detail"]


def test_scaling_past_the_rows_of_the_dataset_is_422_naming_workers(tmp_path: Path) -> None:
    from ray_exception_objects import remote

    from service.ray_errors import user_error

    app, backend = make_app(tmp_path, script=Script(steps_per_poll=1))
    with TestClient(app) as c:
        # 8 workers fit the default budgets (4096 would be refused at admission); the fake's
        # coordinator refuses the resize the way a digits job refuses 4096 shards
        job = c.post("/jobs", json={**SPEC, "steps": 100_000, "max_workers": 8}).json()
        wait_state(c, job["id"], {"running"})
        cause = ValueError(
            "cannot cut 1437 training rows into 4096 non-empty shards; "
            "use fewer workers or a larger dataset"
        )

        def refuse(_n: int) -> None:  # what JobRunner.scale raises for the coordinator's error
            raise user_error(remote(cause), "the coordinator's scale failed") from None

        backend.runners[job["id"]].scale = refuse  # type: ignore[method-assign]
        r = c.post(f"/jobs/{job['id']}/scale", json={"workers": 8})
        assert r.status_code == 422, r.text
        (problem,) = r.json()["errors"]
        assert problem["path"] == "workers"
        assert "cannot cut 1437 training rows into 4096" in problem["message"]
        assert "RayTaskError" not in r.text
        assert c.post(f"/jobs/{job['id']}/cancel").status_code == 202


def test_a_405_lists_every_method_of_the_path(client: TestClient) -> None:
    r = client.request("OPTIONS", "/jobs")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
    r = client.delete("/jobs/abc/cancel")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


@pytest.mark.parametrize(
    ("path", "body", "where"),
    [
        ("/jobs", {**SPEC, "optimizer": {"nesterov": 0}}, "optimizer.nesterov"),
        ("/jobs", {**SPEC, "workers": "2"}, "workers"),
        ("/jobs", {**SPEC, "steps": 6.0}, "steps"),
        ("/jobs/abc/scale", {"workers": "3"}, "workers"),
        ("/jobs/abc/faults", {"kind": "crash", "workers": ["1"]}, "workers.0"),
        ("/drills", {"job": SPEC, "criteria": {"corrupt_refused": 0}}, "criteria.corrupt_refused"),
    ],
)
def test_request_bodies_are_read_as_their_schema_types_them(
    client: TestClient, path: str, body: dict[str, Any], where: str
) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert where in [e["path"] for e in r.json()["errors"]]


def test_a_body_that_is_not_utf8_is_422_saying_so(secured: TestClient) -> None:
    headers = {"content-type": "application/json"}
    assert secured.post("/jobs", content=b"\xff\x1e", headers=headers).status_code == 401
    r = secured.post("/jobs", content=b'{"name": "\xff"}', headers={**headers, **AUTH})
    assert r.status_code == 422 and "not UTF-8 (byte 10" in r.json()["detail"]
    r = secured.post("/drills", content=b"7\xef\xbfK\n", headers={**headers, **AUTH})
    assert r.status_code == 422 and "UTF-8" in r.json()["detail"]
