"""End-to-end fixtures: one Ray instance per test module, real servers in subprocesses.

The Ray instance is started by this (pytest) process without a dashboard; each server is
``python -m service.cli serve`` on 127.0.0.1 with a free port and a temp state directory,
pointed at that Ray with ``RAY_ADDRESS``, so that killing a server (even with -9) leaves
its jobs training in Ray, as in a real deployment. A server made with ``ray_address=None``
starts its own Ray instead (the embedded default), which dies with it.

Each server runs in its own session (process group): stopping it also stops whatever it
started and left behind (the agents of its own Ray instance outlive a ``kill -9``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]

# Digits, 2 workers, a small MLP, 60 steps: trains in about a second once the actors are up.
SMALL_SPEC: dict[str, Any] = {
    "name": "e2e-small",
    "model": {"name": "mlp", "hidden": [32]},
    "dataset": {"name": "digits"},
    "workers": 2,
    "max_workers": 3,
    "steps": 60,
    "batch_size": 32,
    "eval_interval": 20,
    "mode": {"name": "sync"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A Ray instance for this module (4 logical CPUs: room for a few small jobs at once)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, namespace="elastic-sgd", log_to_driver=False)
    address = str(ray.get_runtime_context().gcs_address)
    yield address
    if started:
        ray.shutdown()


@dataclass
class Server:
    """One ``elastic-sgd serve`` subprocess."""

    state_dir: Path
    ray_address: str | None  # None: the server starts its own Ray
    token: str | None = None
    env_extra: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    groups: list[int] = field(default_factory=list)  # process groups of every start

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self, timeout_s: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=timeout_s)

    def start(self, ready_timeout_s: float = 90.0) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "ESGD_STATE_DIR": str(self.state_dir),
            "ESGD_POLL_INTERVAL_S": "0.25",
            **self.env_extra,
        }
        env.pop("RAY_ADDRESS", None)
        if self.ray_address is not None:
            env["RAY_ADDRESS"] = self.ray_address
        env.pop("ESGD_TOKEN", None)
        if self.token:
            env["ESGD_TOKEN"] = self.token
        self.log_path = self.state_dir / f"server-{int(time.time() * 1000)}.log"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.groups.append(self.proc.pid)
        log.close()
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server not ready after {ready_timeout_s} s:\n{self.log()}")

    def kill9(self) -> None:
        """SIGKILL the API process only (what it started is left to fend for itself)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def reap(self) -> None:
        """SIGKILL what is left of earlier runs' process groups (not the running server)."""
        running = self.proc.pid if self.proc is not None and self.proc.poll() is None else None
        for group in self.groups:
            if group != running:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.reap()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path else ""


@pytest.fixture(scope="module")
def make_server(
    ray_address: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def make(token: str | None = None, state_dir: Path | None = None, **env: str) -> Server:
        s = Server(
            state_dir=state_dir or tmp_path_factory.mktemp("state"),
            ray_address=ray_address,
            token=token,
            env_extra=env,
        )
        servers.append(s)
        s.start()
        return s

    yield make
    for s in servers:
        s.stop()


def wait_for(
    fn: Callable[[], Any],
    timeout_s: float = 90.0,
    interval_s: float = 0.25,
    what: str = "condition",
) -> Any:
    """Call ``fn`` until it returns something truthy; fail with ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


def job_in(client: httpx.Client, job_id: str, states: set[str]) -> dict[str, Any] | None:
    j: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
    return j if j["state"] in states else None
