"""``elastic-sgd serve`` as a subprocess: start it, wait until it is ready, stop it.

For what drives the service from outside: the end-to-end and cluster tests, the load
benchmark. The server is configured only by what the caller passes (``ESGD_*`` variables
and ``RAY_ADDRESS`` inherited from the caller's environment are dropped), listens on
127.0.0.1 on a free port, and runs in a session (process group) of its own, so that
stopping it also stops what it started and left behind: the agents of an embedded Ray
outlive a ``kill -9`` of the server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServiceProcess:
    """One ``python -m cli serve`` subprocess.

    Args:
        state_dir: ``ESGD_STATE_DIR`` (created; the server's logs go there too).
        settings: environment variables for the server on top of ``env``: ``ESGD_*``
            settings, ``RAY_ADDRESS`` (none: the server starts its own Ray).
        token: ``ESGD_TOKEN`` (none: no token, loopback only).
        env: the base environment (default: this process's), minus ``ESGD_*`` and
            ``RAY_ADDRESS``.
        cwd: the server's working directory (default: this process's).
        log_level: uvicorn's log level.
    """

    state_dir: Path
    settings: Mapping[str, str] = field(default_factory=dict)
    token: str | None = None
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    log_level: str = "warning"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    # the process group of every start (the server's pid: it leads its own session)
    groups: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self, timeout_s: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=timeout_s)

    def start(self, ready_timeout_s: float = 120.0) -> None:
        self.launch()
        self.wait_ready(ready_timeout_s)

    def launch(self) -> None:
        """Start the server; returns at once (see :meth:`wait_ready`)."""
        base = dict(os.environ if self.env is None else self.env)
        env = {k: v for k, v in base.items() if not k.startswith("ESGD_") and k != "RAY_ADDRESS"}
        env.update(self.settings)
        env["ESGD_STATE_DIR"] = str(self.state_dir)
        if self.token:
            env["ESGD_TOKEN"] = self.token
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.state_dir / f"server-{len(self.groups)}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    *("-m", "cli", "serve", "--host", "127.0.0.1"),
                    *("--port", str(self.port), "--log-level", self.log_level),
                ],
                cwd=self.cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.groups.append(self.proc.pid)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Wait for ``GET /readyz`` to answer 200.

        Raises:
            RuntimeError: the server exited, or was not ready in time (with its log's tail).
        """
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited while starting:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the service was not ready after {timeout_s:g} s:\n{self.log()}")

    def kill9(self) -> None:
        """SIGKILL the server process only (what it started is left to fend for itself)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def reap(self) -> None:
        """SIGKILL what is left of earlier starts' process groups (not a running server)."""
        running = self.proc.pid if self.proc is not None and self.proc.poll() is None else None
        for group in self.groups:
            if group != running:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM (the server stops supervising and shuts its embedded Ray down), then
        SIGKILL if it lingers; then :meth:`reap`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.reap()

    def log(self, tail_chars: int = 5000) -> str:
        """The end of the current start's log."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-tail_chars:]


def stop_named_actors(timeout_s: float) -> bool:
    """Kill every named actor of the Ray instance this process is connected to (the
    coordinators of jobs a test module left running: their workers go with them), then
    wait up to ``timeout_s`` until every CPU is free again; whether they all were. For
    tests that share one Ray instance between modules, never for a service's own Ray."""
    import ray

    for named in ray.util.list_named_actors(all_namespaces=True):
        with contextlib.suppress(ValueError):  # gone meanwhile
            ray.kill(ray.get_actor(named["name"], namespace=named["namespace"]))
    total = ray.cluster_resources().get("CPU", 0.0)
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < total:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True
