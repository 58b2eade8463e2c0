"""One base class for every error elastic-sgd raises on purpose.

Errors cross Ray actor boundaries, so each one pickles with its message intact, and each
message says what went wrong *and* which setting to change.
"""

from __future__ import annotations


class ElasticSGDError(Exception):
    """Base class: a problem the user can act on (bad spec, unknown job, illegal action)."""


class SpecError(ElasticSGDError):
    """A job spec, fault or drill file was refused.

    Args:
        problems: one ``(field_path, message)`` pair per refused field.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        lines = [f"{path}: {msg}" for path, msg in problems]
        super().__init__("invalid job spec:\n  " + "\n  ".join(lines))

    def __reduce__(self) -> tuple[type[SpecError], tuple[list[tuple[str, str]]]]:
        return (SpecError, (self.problems,))


class JobNotFound(ElasticSGDError):
    """No job with that id is known to the service."""


class InvalidTransition(ElasticSGDError):
    """The job's current state forbids the requested action (e.g. scaling a finished job)."""


class InvalidRequest(ElasticSGDError, ValueError):
    """A control request's value is out of range (e.g. scaling past ``max_workers``)."""


class TrainingFailed(ElasticSGDError):
    """The training run could not go on (e.g. fewer live workers than ``min_workers``)."""
