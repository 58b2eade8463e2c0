"""Integration fixtures: one local Ray instance for the whole test session.

Helpers that run jobs and read their files live in ``integration_helpers.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray


@pytest.fixture(scope="session", autouse=True)
def ray_session() -> Iterator[None]:
    """One Ray instance per test session (4 logical CPUs: a coordinator and 4 workers at
    0.25 CPU each fit several times over), shut down at the end."""
    ray.init(num_cpus=4, include_dashboard=False, namespace="elastic-sgd", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
