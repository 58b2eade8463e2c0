"""Real Ray clusters on this machine for the cluster and autoscaler tests.

Each Ray node is one ``ray start --block`` process started in its own session, with its own
temp dir, ports and auth token, and stopped by its pid (SIGTERM: ``ray start --block`` then
stops every process of its node), then by its process group. ``ray stop`` is never used:
it stops *every* Ray instance on the machine, other test sessions' included. The temp dir
also keeps ``ray_current_cluster`` (what a bare ``ray.init()`` connects to) private, so no
other process on the machine joins these clusters by accident.

The service under test is :class:`bench.service_process.ServiceProcess`, pointed at a cluster by
:func:`service_for` (``RAY_ADDRESS`` and the cluster's token).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.service_process import ServiceProcess, free_port

REPO = Path(__file__).resolve().parents[2]
RAY_BIN = str(Path(sys.executable).with_name("ray"))
# What `ray start` prints once its node is registered with the GCS.
STARTED_MARK = "Ray runtime started"
# 256 MiB of object store per node: digits and a small MLP need a few MB; Ray's floor is 75 MiB.
OBJECT_STORE_BYTES = 256 * 1024 * 1024


def wait_for(fn: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.25) -> Any:
    """Call ``fn`` until it returns something truthy; fail naming ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} (last: {last!r})")


@contextlib.contextmanager
def short_temp_dir() -> Iterator[Path]:
    """A temp dir under /tmp: Ray's socket paths live below it and must stay < 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="esgd-ray-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def ray_env(token: str, **extra: str) -> dict[str, str]:
    """Environment of every process of one test cluster (nodes, service, client probes).

    Token auth on, with this cluster's own token (not ``~/.ray/auth_token``); no inherited
    ``RAY_ADDRESS``; no usage-stats reporting.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=str(REPO),
        **extra,
    )
    return env


def service_for(state_dir: Path, token: str, address: str) -> ServiceProcess:
    """The service (not started yet) on the cluster at ``address`` with its ``token``."""
    return ServiceProcess(
        state_dir,
        settings={"RAY_ADDRESS": address, "ESGD_POLL_INTERVAL_S": "0.25"},
        env=ray_env(token),
        cwd=REPO,
        log_level="info",
    )


def new_token() -> str:
    return secrets.token_hex(16)


# What `ray start` says when its raylet did not register within Ray's fixed 30 s (it
# happens when the machine is heavily loaded); the node is then started once more.
STARTUP_TIMEOUT_MARK = "timed out during startup"


@dataclass
class RayNode:
    """One ``ray start <args> --block`` process (a head or a worker node), in its own
    session so that its whole process group can be stopped."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        """Start the process; returns at once (see :meth:`wait_started`)."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def log(self, tail_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail_chars:]

    def wait_started(self, timeout_s: float = 120.0, retries: int = 1) -> None:
        """Wait until the node is registered; start it again (at most ``retries`` times)
        if Ray gave up on a slow raylet.

        Raises:
            RuntimeError: the node exited for another reason, or too often.
        """
        marks = self.log_path.read_text(errors="replace").count(STARTED_MARK)

        def started() -> bool:
            assert self.proc is not None
            text = self.log_path.read_text(errors="replace")
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray node {self.name} exited early:\n{text[-4000:]}")
            return text.count(STARTED_MARK) > marks

        for attempt in range(retries + 1):
            try:
                wait_for(started, timeout_s, f"ray node {self.name} to start", interval_s=0.5)
                return
            except RuntimeError as exc:
                if attempt == retries or STARTUP_TIMEOUT_MARK not in str(exc):
                    raise
                self.stop()
                self.launch()

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (the node stops its own processes), then SIGKILL to its process group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        # anything its node left behind shares its process group (it is a session leader)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def start_node(
    name: str,
    args: list[str],
    temp_dir: Path,
    env: Mapping[str, str],
) -> RayNode:
    """Start ``ray start <args> --block``; returns without waiting."""
    cmd = [
        RAY_BIN,
        "start",
        *args,
        f"--temp-dir={temp_dir}",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        # every node of a cluster on one machine needs its own agent and metrics ports
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        "--disable-usage-stats",
        "--block",
    ]
    node = RayNode(name, cmd, dict(env), temp_dir / f"{name}.log")
    node.launch()
    return node


# Every node of a test cluster binds to loopback: nothing outside this machine can join or
# reach it, and the head's address (127.0.0.1:<port>) is known before the head is up.
NODE_IP = "127.0.0.1"


def head_args(port: int, num_cpus: float, *extra: str) -> list[str]:
    return [
        "--head",
        f"--node-ip-address={NODE_IP}",
        f"--port={port}",
        f"--num-cpus={num_cpus:g}",
        "--include-dashboard=false",
        f"--ray-client-server-port={free_port()}",
        *extra,
    ]


def worker_args(address: str, num_cpus: float, resources: Mapping[str, float]) -> list[str]:
    return [
        f"--address={address}",
        f"--node-ip-address={NODE_IP}",
        f"--num-cpus={num_cpus:g}",
        f"--resources={json.dumps(dict(resources))}",
    ]


def cluster_nodes(address: str, env: Mapping[str, str], timeout_s: float = 60.0) -> list[Any]:
    """``ray.nodes()`` of the cluster at ``address``, read by a short-lived client process
    (this pytest process may hold the session's own Ray instance)."""
    code = (
        "import json, ray\n"
        f"ray.init(address={address!r}, log_to_driver=False)\n"
        "print('NODES=' + json.dumps([{'id': n['NodeID'], 'alive': n['Alive'], "
        "'resources': n['Resources']} for n in ray.nodes()]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    for line in out.stdout.splitlines():
        if line.startswith("NODES="):
            nodes: list[Any] = json.loads(line.removeprefix("NODES="))
            return nodes
    raise RuntimeError(f"could not list the nodes of {address}:\n{out.stderr[-3000:]}")


class Stopwatch:
    """Seconds spent in each stage of a test (printed, and shown when an assertion fails)."""

    def __init__(self) -> None:
        self.t0 = self.last = time.monotonic()
        self.laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps.append((name, now - self.last))
        self.last = now
        print(f"[{now - self.t0:6.1f} s] {name} (+{self.laps[-1][1]:.1f} s)", flush=True)

    def __str__(self) -> str:
        return ", ".join(f"{n} {s:.1f} s" for n, s in self.laps)


def job_state(client: httpx.Client, job_id: str) -> dict[str, Any]:
    r = client.get(f"/jobs/{job_id}")
    r.raise_for_status()
    job: dict[str, Any] = r.json()
    return job
