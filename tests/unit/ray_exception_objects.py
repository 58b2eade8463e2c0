"""Ray's own exception objects, built in this process the way ``ray.get`` builds them.

No cluster is needed: a ``RayTaskError`` is made from the formatted traceback of a real
exception (as an actor's worker does) and turned into an instance of the cause's class by
``as_instanceof_cause`` (as ``ray.get`` does); an actor whose constructor raised answers
with ``ActorDiedError.from_task_error`` of that constructor's ``RayTaskError``.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable

from ray.exceptions import ActorDiedError, RayTaskError


def _coordinator_method(raise_it: Callable[[], None]) -> None:
    """A frame for the traceback, like a coordinator method's."""
    raise_it()


def task_error(exc: Exception, function_name: str) -> RayTaskError:
    """The ``RayTaskError`` an actor's worker makes when ``function_name`` raised ``exc``."""

    def raise_it() -> None:
        raise exc

    try:
        _coordinator_method(raise_it)
    except Exception as raised:  # noqa: BLE001 - any exception: it is what we wrap
        tb = "".join(traceback.format_exception(raised))
        return RayTaskError(
            function_name, tb, raised, proctitle=f"ray::{function_name}", pid=4242, ip="10.0.0.7"
        )
    raise AssertionError("unreachable: raise_it raised")


def remote(exc: Exception, function_name: str = "Coordinator.scale") -> RayTaskError:
    """What ``ray.get`` raises when an actor method raised ``exc``."""
    as_cause = task_error(exc, function_name).as_instanceof_cause()
    assert isinstance(as_cause, RayTaskError)
    return as_cause


def constructor_failed(exc: Exception) -> ActorDiedError:
    """What every call to an actor whose constructor raised ``exc`` raises."""
    return ActorDiedError.from_task_error(task_error(exc, "Coordinator.__init__"))
