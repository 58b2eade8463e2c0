"""The one place that turns what a Ray call raised into the error a user sees.

An exception raised inside an actor method comes back from ``ray.get`` as a
``RayTaskError``: an instance of both ``RayTaskError`` and the original class (e.g.
``RayTaskError(SpecError)``), whose ``cause`` is the original and whose ``str()`` is the
remote traceback, coloured with ANSI codes. An actor whose constructor raised answers
every call with an ``ActorDiedError`` that keeps only that traceback's text. Neither text
belongs in an HTTP error, a job's recorded error or the CLI's output.

:func:`user_error` gives back our own error when one was raised inside the actor (its
message already says what to change) and otherwise builds one from a sentence naming what
failed and :func:`describe`'s ``Type: message`` of the cause (no traceback, no colour
codes). The traceback stays reachable for the logs: callers raise the result ``from`` the
Ray exception.
"""

from __future__ import annotations

import re

from core.errors import ElasticSGDError, TrainingFailed

# ANSI escape sequences (Ray colours the process title at the head of a remote traceback)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# a message is cut here: an error is read in one line of a log or a table cell
MAX_DETAIL_CHARS = 300
# "core.errors.SpecError: ..." -> "SpecError: ..." (the last line of a Python traceback)
_QUALIFIED = re.compile(r"^(?:[A-Za-z_][\w]*\.)+(?=[A-Za-z_]\w*(?::|$))")


def own_error(exc: BaseException) -> ElasticSGDError | None:
    """Our own error that ``exc`` is, or that Ray wrapped in ``exc``; else ``None``."""
    cause = _remote_cause(exc)
    if cause is not None:
        return cause if isinstance(cause, ElasticSGDError) else None
    return exc if isinstance(exc, ElasticSGDError) else None


def describe(exc: BaseException) -> str:
    """``Type: message`` of what went wrong (a Ray wrapper is seen through), in one line.

    Args:
        exc: any exception, a Ray one included.

    Returns:
        The cause's class name and message, without traceback, colour codes or line
        breaks, cut at :data:`MAX_DETAIL_CHARS` characters.
    """
    cause = _remote_cause(exc)
    if cause is not None:
        return describe(cause)
    creation = _creation_failure(exc)
    if creation is not None:
        return _cut(f"its constructor raised {creation}")
    # an ActorDiedError lists class, actor id, pid, ... on tab-indented lines: left out
    lines = [line for line in _ANSI.sub("", str(exc)).splitlines() if not line.startswith("\t")]
    message = _one_line("\n".join(lines))
    return _cut(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


def user_error(
    exc: BaseException,
    failed: str = "",
    *,
    error_type: type[ElasticSGDError] = TrainingFailed,
    advice: str = "",
) -> ElasticSGDError:
    """The error to show a user for ``exc``, raised by (or around) a Ray call.

    Args:
        exc: what the call raised.
        failed: what failed, as the start of a sentence (``"the coordinator could not
            start"``); the cause follows it after a colon.
        error_type: the class of the error built when ``exc`` is not one of ours.
        advice: what to do about it, appended after a semicolon.

    Returns:
        Our own error if ``exc`` is or wraps one (unchanged: it already says what to
        change), else an ``error_type`` whose message is ``failed``, the cause's
        :func:`describe` and ``advice``.
    """
    own = own_error(exc)
    if own is not None:
        return own
    message = f"{failed}: {describe(exc)}" if failed else describe(exc)
    if advice:
        message = f"{message.rstrip('.')}; {advice}"
    return error_type(message)


def _remote_cause(exc: BaseException) -> BaseException | None:
    """The original exception if ``exc`` is Ray's wrapper of one raised remotely."""
    if not _from_ray(exc):
        return None  # not Ray's (and Ray need not be loaded to tell)
    from ray.exceptions import RayTaskError

    if isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException):
        return exc.cause
    return None


def _creation_failure(exc: BaseException) -> str | None:
    """``Type: message`` of the exception an actor's constructor raised, if ``exc`` is the
    ``ActorDiedError`` that reports it (Ray keeps only the remote traceback's text)."""
    if not _from_ray(exc):
        return None
    from ray.exceptions import RayActorError

    if not isinstance(exc, RayActorError) or not exc.actor_init_failed:
        return None
    return _exception_of_traceback(_ANSI.sub("", str(exc))) or None


def _from_ray(exc: BaseException) -> bool:
    module = type(exc).__module__
    return module == "ray" or module.startswith("ray.")


def _exception_of_traceback(text: str) -> str:
    """The closing ``Type: message`` of a formatted traceback (after its last frame)."""
    lines = text.splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    rest = lines[frames[-1] + 1 :] if frames else lines
    # a frame's source line and caret marks are indented by 4; the exception starts at 0
    while rest and (rest[0].startswith("    ") or not rest[0].strip()):
        rest = rest[1:]
    return _QUALIFIED.sub("", _one_line("\n".join(rest)))


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _cut(text: str) -> str:
    if len(text) <= MAX_DETAIL_CHARS:
        return text
    return text[: MAX_DETAIL_CHARS - 1].rstrip() + "…"
