"""What a user sees of an error raised inside a Ray actor (service.ray_errors).

The exceptions are Ray's own classes, built in this process the way Ray builds them on a
``ray.get`` (a ``RayTaskError`` from the formatted traceback of a real exception, made an
instance of the cause's class by ``as_instanceof_cause``; an ``ActorDiedError`` from the
``RayTaskError`` of a failed constructor): no cluster is needed, and nothing is mocked.
"""

from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError
from ray_exception_objects import constructor_failed, remote

from core.errors import (
    ElasticSGDError,
    InvalidRequest,
    InvalidTransition,
    SpecError,
    TrainingFailed,
)
from service.ray_errors import MAX_DETAIL_CHARS, describe, own_error, user_error

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def assert_clean(text: str) -> None:
    """One line for a person: no traceback, no colour codes, no remote frames."""
    assert "\x1b" not in text
    assert "Traceback" not in text and 'File "' not in text and "\n" not in text
    assert "pid=" not in text and "raise_it" not in text


def test_our_error_raised_in_an_actor_comes_back_as_it_was() -> None:
    original = InvalidRequest("scale: n=9 is above max_workers=4; raise max_workers")
    exc = remote(original)
    assert isinstance(exc, InvalidRequest)  # Ray's wrapper is also an instance of the cause
    assert "\x1b" in str(exc) and "raise_it" in str(exc)  # ... and reads as a traceback
    assert own_error(exc) is original
    assert user_error(exc, "the coordinator's scale failed") is original


def test_a_spec_error_keeps_its_problems() -> None:
    original = SpecError([("dataset.path", "no such file; put it under data/")])
    got = user_error(remote(original))
    assert isinstance(got, SpecError)
    assert got.problems == [("dataset.path", "no such file; put it under data/")]


def test_a_foreign_error_becomes_one_sentence_naming_its_type() -> None:
    exc = remote(KeyError("learning_rate"))
    got = user_error(exc, "the coordinator's scale failed", advice="see the Ray logs")
    assert type(got) is TrainingFailed
    assert str(got) == (
        "the coordinator's scale failed: KeyError: 'learning_rate'; see the Ray logs"
    )
    assert_clean(str(got))
    assert own_error(exc) is None


def test_error_type_chooses_the_class_of_a_built_error() -> None:
    got = user_error(
        remote(RuntimeError("boom")), "job j1: cancel failed", error_type=InvalidTransition
    )
    assert isinstance(got, InvalidTransition)
    assert str(got) == "job j1: cancel failed: RuntimeError: boom"


def test_a_multi_line_foreign_message_is_joined_into_one_line() -> None:
    got = user_error(remote(ValueError("first line\n  second line\n")))
    assert str(got) == "ValueError: first line second line"


def test_a_failed_constructor_is_named_with_the_error_it_raised() -> None:
    # Ray answers every call to an actor whose __init__ raised with this ActorDiedError,
    # which keeps only the text of the constructor's traceback
    exc = constructor_failed(TrainingFailed("need 2 workers, the cluster has 1 CPU"))
    assert exc.actor_init_failed
    got = user_error(exc, "the coordinator could not start")
    assert str(got) == (
        "the coordinator could not start: its constructor raised TrainingFailed: "
        "need 2 workers, the cluster has 1 CPU"
    )
    assert_clean(str(got))


def test_a_failed_constructor_with_a_multi_line_message() -> None:
    got = describe(constructor_failed(SpecError([("workers", "must be >= 1")])))
    assert got == "its constructor raised SpecError: invalid job spec: workers: must be >= 1"


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            ActorDiedError(),
            "ActorDiedError: The actor died unexpectedly before finishing this task.",
        ),
        (
            ActorUnavailableError("connection refused", None),
            "ActorUnavailableError: The actor None is unavailable: connection refused. "
            "The task may or may not have been executed on the actor.",
        ),
        (
            GetTimeoutError("Get timed out: some object(s) not ready."),
            "GetTimeoutError: Get timed out: some object(s) not ready.",
        ),
        (
            ConnectionError("GCS at 10.0.0.1:6379 unreachable"),
            "ConnectionError: GCS at 10.0.0.1:6379 unreachable",
        ),
        (RuntimeError(), "RuntimeError"),
    ],
)
def test_describe_ray_and_other_errors(exc: Exception, expected: str) -> None:
    assert describe(exc) == expected
    built = user_error(exc, "job j1: poll failed")
    assert type(built) is TrainingFailed and str(built) == f"job j1: poll failed: {expected}"


def test_an_actor_death_leaves_out_its_detail_lines() -> None:
    from ray.core.generated.common_pb2 import ActorDiedErrorContext

    context = ActorDiedErrorContext(
        error_message="The actor is dead because its worker process has died.",
        class_name="Coordinator",
        actor_id=b"\x01" * 16,
        name="esgd-j1",
        ray_namespace="elastic-sgd",
        node_ip_address="10.0.0.7",
        pid=4242,
    )
    exc = ActorDiedError(context)
    assert "\tclass_name: Coordinator" in str(exc)
    assert describe(exc) == (
        "ActorDiedError: The actor died unexpectedly before finishing this task. "
        "The actor is dead because its worker process has died."
    )


def test_our_own_error_outside_ray_is_returned_unchanged() -> None:
    original = InvalidTransition("job j1 is succeeded; only running jobs can be scaled")
    assert user_error(original, "scale failed") is original
    assert describe(original) == f"InvalidTransition: {original}"


def test_a_long_message_is_cut() -> None:
    got = describe(remote(RuntimeError("x" * 1000)))
    assert len(got) == MAX_DETAIL_CHARS and got.endswith("…")
    assert got.startswith("RuntimeError: xxx")


def test_every_built_error_is_ours() -> None:
    for exc in (remote(OSError(28, "No space left on device")), ActorDiedError()):
        assert isinstance(user_error(exc), ElasticSGDError)
