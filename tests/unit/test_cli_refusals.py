"""Unit tests of how the CLI (through elastic_sgd.Client) says a refusal: the refused fields
one per line, else the service's reason, and no service at the URL; all with exit code 2.
The service is a small real HTTP server in this process that answers with fixed refusals."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bench.service_process import free_port
from cli.main import app

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

# What the service answers per route (api.errors' ErrorPublic bodies).
ANSWERS: dict[str, tuple[int, dict[str, object]]] = {
    "/jobs": (
        422,
        {
            "detail": "invalid request: ...",
            "errors": [{"path": "mode.beta", "message": "must be at most 1"}],
            "errors_omitted": 0,
        },
    ),
    "/jobs/j1/cancel": (
        409,
        {"detail": "job j1 is succeeded: it cannot be cancelled", "errors": []},
    ),
}


class _Refuser(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, body = ANSWERS[self.path]
        out = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def service() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Refuser)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def said(output: str) -> str:
    return " ".join(output.split())


def test_refused_fields_are_listed_one_per_line(service: str, tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"name": "j", "steps": 10}))
    got = CliRunner().invoke(app, ["submit", str(spec), "--url", service])
    assert got.exit_code == 2
    assert "error 422: refused:" in got.output
    assert "mode.beta: must be at most 1" in said(got.output)


def test_a_refusal_without_fields_gives_the_services_reason(service: str) -> None:
    got = CliRunner().invoke(app, ["cancel", "j1", "--url", service])
    assert got.exit_code == 2
    assert "409: job j1 is succeeded: it cannot be cancelled" in said(got.output)


def test_no_service_at_the_url_is_said_with_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    got = CliRunner().invoke(app, ["status", "--url", url])
    assert got.exit_code == 2
    assert f"cannot reach the service at {url}" in said(got.output)
    assert "elastic-sgd serve" in said(got.output)
