"""Service settings: env prefix, RAY_ADDRESS, and the refusal to listen publicly without a token."""

from __future__ import annotations

import pytest

from service.settings import Settings, SettingsError, is_loopback, load_settings

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

TOKEN = "tok-0123456789abcdef-0123456789"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in (
        "ESGD_HOST",
        "ESGD_TOKEN",
        "ESGD_PORT",
        "ESGD_RAY_ADDRESS",
        "RAY_ADDRESS",
        "ESGD_POLL_INTERVAL_S",
        "ESGD_MAX_BODY_BYTES",
    ):
        monkeypatch.delenv(key, raising=False)


@pytest.mark.parametrize(
    ("host", "loop"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("127.8.9.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host: str, loop: bool) -> None:
    assert is_loopback(host) is loop


def test_defaults_are_safe() -> None:
    s = Settings()
    assert s.host == "127.0.0.1" and s.token is None and s.ray_address is None
    assert s.db_path.name == "elastic-sgd.sqlite3" and s.runs_dir.parent == s.state_dir


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "my-host.example"])
def test_public_host_without_token_is_refused(host: str) -> None:
    with pytest.raises(SettingsError, match="ESGD_TOKEN") as ei:
        load_settings(host=host)
    assert ei.value.problems[0][0] == "settings"
    assert load_settings(host=host, token=TOKEN).token_value == TOKEN


def test_short_token_is_refused() -> None:
    with pytest.raises(SettingsError, match="at least 16"):
        load_settings(token="short")


@pytest.mark.parametrize(
    ("token", "why"),
    [
        (" " * 16, "printable ASCII without spaces"),  # HTTP strips it: it can never match
        ("pässwörd-0123456789", "U+00E4, U+00F6"),  # not sendable in a header
        ("tab\tseparated-0123456789", "U+0009"),
        ("a" * 32, "only 1 distinct"),
        ("abab" * 8, "only 2 distinct"),
    ],
)
def test_a_token_that_could_never_match_or_is_guessable_is_refused(token: str, why: str) -> None:
    with pytest.raises(SettingsError) as ei:
        load_settings(token=token)
    message = str(ei.value)
    assert why in message and "ESGD_TOKEN" in message
    assert token not in message  # the refused secret is not echoed


def test_a_random_token_is_accepted() -> None:
    import secrets

    token = secrets.token_urlsafe(24)
    assert load_settings(token=token).token_value == token


def test_environment_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESGD_HOST", "0.0.0.0")
    monkeypatch.setenv("ESGD_TOKEN", TOKEN)
    monkeypatch.setenv("ESGD_PORT", "9001")
    s = load_settings()
    assert (s.host, s.port, s.token_value) == ("0.0.0.0", 9001, TOKEN)
    assert TOKEN not in repr(s)  # the token is a secret: never printed


def test_ray_address_from_either_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert Settings().ray_address == "10.0.0.1:6379"
    monkeypatch.setenv("ESGD_RAY_ADDRESS", "10.0.0.2:6379")
    assert Settings().ray_address == "10.0.0.2:6379"  # the service's own variable wins
    assert load_settings(ray_address="auto").ray_address == "auto"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", 0),
        ("port", 70000),
        ("poll_interval_s", 0),
        ("max_body_bytes", 10),
        ("unknown_setting", 1),
    ],
)
def test_out_of_range_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(SettingsError) as ei:
        load_settings(**{field: value})
    assert ei.value.problems[0][0] == field
