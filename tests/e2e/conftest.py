"""End-to-end fixtures: one Ray instance per test session, real servers in subprocesses.

The Ray instance is started by this (pytest) process without a dashboard, once (starting
Ray costs seconds; the integration tests' session fixture reuses the same instance when
both run in one session); each server is
``python -m cli serve`` on 127.0.0.1 with a free port and a temp state directory,
pointed at that Ray with ``RAY_ADDRESS``, so that killing a server (even with -9) leaves
its jobs training in Ray, as in a real deployment. A server made with ``ray_address=None``
starts its own Ray instead (the embedded default), which dies with it.

Each server runs in its own session (process group): stopping it also stops whatever it
started and left behind (the agents of its own Ray instance outlive a ``kill -9``). What a
module's servers started in the shared Ray instance is stopped when the module ends
(:func:`make_server`), so that every module starts on an idle instance.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.service_process import ServiceProcess, stop_named_actors
from service import ray_conn

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


# A module's leftover actors, killed at its end, give their CPUs back within this bound.
RAY_IDLE_TIMEOUT_S = 60.0


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """A Ray instance for the session (4 logical CPUs: room for a few small jobs at once)."""
    started = not ray_conn.is_connected()
    address = ray_conn.connect(None, num_cpus=4)
    yield address
    if started:
        ray_conn.disconnect()


# The tests' name for a server subprocess.
Server = ServiceProcess


def e2e_server(
    state_dir: Path, ray_address: str | None, token: str | None = None, **env: str
) -> Server:
    """A server (not started) for these tests: polls every 0.25 s, runs from the checkout."""
    settings = {"ESGD_POLL_INTERVAL_S": "0.25", **env}
    if ray_address is not None:
        settings["RAY_ADDRESS"] = ray_address
    return Server(
        state_dir,
        settings=settings,
        token=token,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def make_server(
    ray_address: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def make(token: str | None = None, state_dir: Path | None = None, **env: str) -> Server:
        s = e2e_server(state_dir or tmp_path_factory.mktemp("state"), ray_address, token, **env)
        servers.append(s)
        s.start()
        return s

    yield make
    for s in servers:
        s.stop()
    stop_leftover_actors()


def stop_leftover_actors() -> None:
    """Kill the named actors a module left in the shared Ray instance and wait for their
    CPUs (:func:`bench.service_process.stop_named_actors`).

    Raises:
        AssertionError: CPUs were still held after :data:`RAY_IDLE_TIMEOUT_S`.
    """
    assert stop_named_actors(RAY_IDLE_TIMEOUT_S), (
        f"the module's actors did not give their CPUs back within {RAY_IDLE_TIMEOUT_S} s"
    )


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
