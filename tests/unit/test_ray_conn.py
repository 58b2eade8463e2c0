"""Where the project's one Ray connector goes (service.ray_conn): the address rule.

No Ray instance is started here: the embedded and cluster paths run in the integration
and end-to-end suites (their fixtures connect through :func:`service.ray_conn.connect`;
``tests/integration/test_cluster.py`` points a service at a real cluster by RAY_ADDRESS).
"""

from __future__ import annotations

import pytest

from service import ray_conn
from service.settings import load_settings

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

# (ESGD_RAY_ADDRESS, RAY_ADDRESS) -> the address; None: unset variable / embedded Ray
CASES: list[tuple[str | None, str | None, str | None]] = [
    (None, None, None),
    (None, "", None),  # empty: embedded, never a search for a local cluster
    (None, "  ", None),
    (None, "10.0.0.1:6379", "10.0.0.1:6379"),
    (None, "auto", "auto"),  # asked for by name: the cluster `ray start` runs here
    ("10.0.0.2:6379", "10.0.0.1:6379", "10.0.0.2:6379"),  # the service's own variable wins
    ("", "10.0.0.1:6379", None),  # set but empty: embedded, whatever RAY_ADDRESS says
    ("ray://head:10001", None, "ray://head:10001"),
]


@pytest.mark.parametrize(("esgd", "ray_var", "expected"), CASES)
def test_address_from_env(esgd: str | None, ray_var: str | None, expected: str | None) -> None:
    env = {
        name: value
        for name, value in (("ESGD_RAY_ADDRESS", esgd), ("RAY_ADDRESS", ray_var))
        if value is not None
    }
    assert ray_conn.address_from_env(env) == expected


@pytest.mark.parametrize(("esgd", "ray_var", "expected"), CASES)
def test_the_service_settings_follow_the_same_rule(
    monkeypatch: pytest.MonkeyPatch, esgd: str | None, ray_var: str | None, expected: str | None
) -> None:
    for name, value in (("ESGD_RAY_ADDRESS", esgd), ("RAY_ADDRESS", ray_var)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert load_settings().ray_address == expected == ray_conn.address_from_env()


def test_address_from_env_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ESGD_RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    assert ray_conn.address_from_env() == "10.0.0.9:6379"


def test_a_cluster_address_with_a_cpu_count_is_refused() -> None:
    if ray_conn.is_connected():
        pytest.skip("this process is connected to Ray: connect() keeps that connection")
    with pytest.raises(ray_conn.RayConnectionError, match="drop one of them"):
        ray_conn.connect("10.0.0.1:6379", num_cpus=4)
    assert not ray_conn.is_connected()
