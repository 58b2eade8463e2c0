"""Integration fixtures: one local Ray instance for the whole test session.

Helpers that run jobs and read their files live in ``integration_helpers.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray

from bench.service_process import stop_named_actors
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
    if ray.is_initialized():
        stop_named_actors(IDLE_TIMEOUT_S)
