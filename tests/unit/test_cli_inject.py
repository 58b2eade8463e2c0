"""Unit tests for ``elastic-sgd inject`` (cli/main.py): the ``corrupt`` kind's options reach
the fault the service is sent, and a bad corrupt fault is refused before anything is sent,
with what to change. The service is a small real HTTP server in this process that records
what it receives and answers as the service does (202 and the job)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.main import app

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


# The job as POST /jobs/{id}/faults answers it (api.schemas.JobPublic).
JOB = {
    "id": "j1",
    "name": "job",
    "state": "running",
    "terminal": False,
    "created_at": "2026-01-01T00:00:00Z",
    "updated_at": "2026-01-01T00:00:01Z",
    "started_at": "2026-01-01T00:00:01Z",
    "finished_at": None,
    "step": 5,
    "total_steps": 100,
    "progress": 0.05,
    "workers": [],
    "b_hat_max": None,
    "b_hat_mean": None,
    "bound": None,
    "error": None,
    "drill_id": None,
}


class _Recorder(BaseHTTPRequestHandler):
    received: list[tuple[str, Any]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Recorder.received.append((self.path, body))
        out = json.dumps(JOB).encode()
        self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


@pytest.fixture
def service() -> Iterator[str]:
    _Recorder.received = []
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_corrupt_fault_is_sent_with_its_corruption(service: str) -> None:
    args = ["inject", "j1", "--kind", "corrupt", "--workers", "2", "--corruption", "scale"]
    got = CliRunner().invoke(app, [*args, "--scale-factor", "-3", "--url", service])
    assert got.exit_code == 0, got.output
    ((path, body),) = _Recorder.received
    assert path == "/jobs/j1/faults"
    assert body["kind"] == "corrupt" and body["workers"] == [2]
    assert (body["corruption"], body["scale_factor"]) == ("scale", -3.0)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "corrupt needs corruption"),
        (["--corruption", "scale"], "corruption: scale needs scale_factor"),
    ],
)
def test_a_bad_corrupt_fault_is_refused_before_it_is_sent(
    service: str, extra: list[str], message: str
) -> None:
    args = ["inject", "j1", "--kind", "corrupt", *extra, "--url", service]
    got = CliRunner().invoke(app, args)
    assert got.exit_code == 2
    assert message in " ".join(got.output.split())
    assert _Recorder.received == []
