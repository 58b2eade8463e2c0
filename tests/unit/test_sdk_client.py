"""Unit tests of elastic_sgd.Client's own logic: which exception an error answer becomes
(with its field errors), the wrapping of connection errors, the token, the bodies and
queries it sends, and the typed models it returns. HTTP is faked with httpx.MockTransport
(tests/e2e/test_sdk_e2e.py drives the same client against a real service)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import elastic_sgd
from core.errors import SpecError
from core.spec import FaultSpec
from elastic_sgd import (
    ApiError,
    Client,
    Conflict,
    Forbidden,
    JobDetail,
    NotFound,
    PayloadTooLarge,
    RequestRefused,
    ServerFailed,
    ServiceUnreachable,
    TooManyRequests,
    Unauthorized,
    ValidationFailed,
)
from elastic_sgd.errors import error_class, error_of

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

URL = "http://esgd.test:8000"

JOB: dict[str, Any] = {
    "id": "j-1",
    "name": "api",
    "state": "pending",
    "terminal": False,
    "created_at": "2026-01-01T00:00:00Z",
    "updated_at": "2026-01-01T00:00:00Z",
    "started_at": None,
    "finished_at": None,
    "step": 0,
    "total_steps": 10,
    "progress": 0.0,
    "workers": [],
    "b_hat_max": None,
    "b_hat_mean": None,
    "bound": None,
    "error": None,
    "drill_id": None,
}
DETAIL = {**JOB, "spec": {"name": "api"}, "summary": None, "checkpoints": []}


def client_of(handler: Callable[[httpx.Request], httpx.Response], **kw: Any) -> Client:
    return Client(URL, transport=httpx.MockTransport(handler), **kw)


def refusal(status: int, detail: str, errors: list[dict[str, str]] | None = None) -> Any:
    body = {"detail": detail, "errors": errors or [], "errors_omitted": 0}
    return lambda _req: httpx.Response(status, json=body)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, RequestRefused),
        (401, Unauthorized),
        (403, Forbidden),
        (404, NotFound),
        (405, RequestRefused),
        (409, Conflict),
        (413, PayloadTooLarge),
        (422, ValidationFailed),
        (429, TooManyRequests),
        (500, ServerFailed),
        (503, ServerFailed),
        (304, ApiError),
    ],
)
def test_each_status_has_its_exception(status: int, cls: type[ApiError]) -> None:
    assert error_class(status) is cls
    assert issubclass(cls, ApiError)


def test_a_422_carries_the_refused_fields_with_their_paths() -> None:
    errors = [
        {"path": "batch_size", "message": "Input should be greater than or equal to 1"},
        {"path": "mode.beta", "message": "Input should be less than or equal to 1"},
    ]
    c = client_of(refusal(422, "invalid request: batch_size: ...", errors))
    with pytest.raises(ValidationFailed) as got:
        c.submit({"batch_size": 0})
    exc = got.value
    assert exc.status == 422 and exc.method == "POST" and exc.path == "/jobs"
    assert [e.path for e in exc.errors] == ["batch_size", "mode.beta"]
    assert exc.problems[1] == ("mode.beta", "Input should be less than or equal to 1")
    assert "mode.beta: Input should be less" in str(exc)
    assert isinstance(exc, RequestRefused)


def test_a_401_says_what_the_service_said() -> None:
    c = client_of(refusal(401, "this route needs a bearer token: send ..."))
    with pytest.raises(Unauthorized, match="needs a bearer token") as got:
        c.cancel("j-1")
    assert got.value.status == 401 and got.value.errors == []


def test_a_body_that_is_not_the_services_becomes_the_detail() -> None:
    c = client_of(lambda _r: httpx.Response(502, text="<html>Bad Gateway</html>"))
    with pytest.raises(ServerFailed, match="Bad Gateway") as got:
        c.get("j-1")
    assert got.value.status == 502
    other = error_of(404, json.dumps({"detail": "Not Found"}).encode())
    assert isinstance(other, NotFound) and other.detail == "Not Found"


def test_errors_pickle_with_their_fields() -> None:
    exc = error_of(
        422,
        json.dumps(
            {"detail": "d", "errors": [{"path": "workers", "message": "m"}], "errors_omitted": 3}
        ).encode(),
        "POST",
        "/jobs",
    )
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is ValidationFailed
    assert (back.status, back.problems, back.errors_omitted) == (422, [("workers", "m")], 3)
    gone = pickle.loads(pickle.dumps(ServiceUnreachable(URL, "ConnectError")))
    assert gone.url == URL and str(gone) == str(ServiceUnreachable(URL, "ConnectError"))


def test_no_answer_is_service_unreachable_naming_the_url() -> None:
    def refuse(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=req)

    with pytest.raises(ServiceUnreachable) as got:
        client_of(refuse).list()
    assert got.value.url == URL
    assert URL in str(got.value) and "ConnectError" in str(got.value)
    assert isinstance(got.value.__cause__, httpx.ConnectError)


def test_the_token_is_sent_as_a_bearer_header() -> None:
    seen: list[httpx.Request] = []

    def answer(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(202, json=JOB)

    with client_of(answer, token="t0k") as c:
        c.scale("j-1", 3)
    assert seen[0].headers["Authorization"] == "Bearer t0k"
    assert json.loads(seen[0].content) == {"workers": 3}
    anonymous = client_of(answer)
    anonymous.cancel("j-1")
    assert "Authorization" not in seen[1].headers


def test_specs_faults_and_queries_go_out_as_the_api_takes_them(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def answer(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        if req.url.path == "/jobs" and req.method == "POST":
            return httpx.Response(201, json=DETAIL)
        if req.url.path.endswith("/metrics"):
            return httpx.Response(200, json={"job_id": "j-1", "items": [], "last_seq": None})
        return httpx.Response(202, json=JOB)

    c = client_of(answer)
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump({"name": "api", "steps": "10"}))  # YAML is lax
    job = c.submit(spec_file)
    assert isinstance(job, JobDetail) and job.id == "j-1"
    sent = json.loads(seen[-1].content)
    assert sent["steps"] == 10 and sent["name"] == "api" and "mode" in sent
    c.submit({"name": "raw", "steps": "10"})  # a mapping goes as it is: the API decides
    assert json.loads(seen[-1].content) == {"name": "raw", "steps": "10"}
    fault = FaultSpec(kind="crash", workers=[1])
    c.inject("j-1", fault)
    sent = json.loads(seen[-1].content)
    assert seen[-1].url.path == "/jobs/j-1/faults" and None not in sent.values()
    assert FaultSpec.model_validate(sent) == fault
    c.metrics("j-1", after_seq=5, kind="eval")
    assert dict(seen[-1].url.params) == {"after_seq": "5", "kind": "eval", "limit": "1000"}


def test_a_bad_spec_file_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []
    c = client_of(lambda r: seen.append(r) or httpx.Response(201, json=DETAIL))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"steps": 10, "batch_size": 0}))
    with pytest.raises(SpecError) as got:
        c.submit(bad)
    assert got.value.problems[0][0] == "batch_size"
    with pytest.raises(SpecError, match="cannot read"):
        c.submit_drill(tmp_path / "missing.yaml")
    assert seen == []


def test_readiness_returns_a_503_body_and_the_model_its_bytes(tmp_path: Path) -> None:
    not_ready = {"status": "not ready", "store": True, "ray": False, "supervisor": True}

    def answer(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/readyz":
            return httpx.Response(503, json={**not_ready, "detail": "not ready: ray"})
        return httpx.Response(200, content=b"\x80weights")

    c = client_of(answer)
    ready = c.ready()
    assert ready.status == "not ready" and ready.ray is False
    out = c.download_model("j-1", tmp_path / "m.pt")
    assert out.read_bytes() == b"\x80weights"


def test_wait_polls_until_the_job_is_terminal() -> None:
    states = iter(["running", "running", "succeeded"])

    def answer(_req: httpx.Request) -> httpx.Response:
        s = next(states)
        return httpx.Response(200, json={**DETAIL, "state": s, "terminal": s == "succeeded"})

    done = client_of(answer).wait("j-1", interval_s=0.0)
    assert done.state == "succeeded"
    stuck = client_of(lambda _r: httpx.Response(200, json={**DETAIL, "state": "running"}))
    with pytest.raises(TimeoutError, match="still running"):
        stuck.wait("j-1", timeout_s=0.0, interval_s=0.0)


def test_the_client_and_the_cli_start_without_torch_or_ray() -> None:
    """What only talks HTTP imports neither (the CLI's status, logs, submit start in a
    fraction of a second); the task interface and a local run load them on first use."""
    code = (
        "import sys, elastic_sgd, cli.main\n"
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))\n"
        "elastic_sgd.Task, elastic_sgd.run\n"
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "['ray', 'torch']"], out.stdout
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = elastic_sgd.Nope
