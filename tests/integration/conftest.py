"""Integration fixtures: one local Ray instance for the whole test session.

Helpers that run jobs and read their files live in ``integration_helpers.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import ray

from service import ray_conn

# A module's leftover actors, killed at its end, give their CPUs back within this bound.
IDLE_TIMEOUT_S = 60.0


@pytest.fixture(scope="session", autouse=True)
def ray_session() -> Iterator[None]:
    """One Ray instance per test session (4 logical CPUs: a coordinator and 4 workers at
    0.25 CPU each fit several times over), embedded in this process whatever RAY_ADDRESS
    says (the cluster tests start their own clusters), shut down at the end. When the
    end-to-end tests ran first in this session, their instance (also 4 CPUs, idle between
    modules: ``tests/e2e/conftest.py``) is reused rather than a second one started."""
    ray_conn.connect(None, num_cpus=4)
    try:
        yield
    finally:
        ray_conn.disconnect()


@pytest.fixture(scope="module", autouse=True)
def idle_after_module() -> Iterator[None]:
    """At a module's end, kill the named actors its jobs left (a failed or timed-out job's
    coordinator and workers) and wait for their CPUs, so the next module starts on an idle
    instance (a module once found CPU=0 free and its workers were never placed)."""
    yield
    if not ray.is_initialized():
        return
    for named in ray.util.list_named_actors(all_namespaces=True):
        try:
            ray.kill(ray.get_actor(named["name"], namespace=named["namespace"]))
        except ValueError:
            continue  # gone meanwhile
    total = ray.cluster_resources().get("CPU", 0.0)
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while time.monotonic() < deadline and ray.available_resources().get("CPU", 0.0) < total:
        time.sleep(0.5)
