"""elastic-sgd's Python SDK: drive the service, train locally, bring your own task.

* :class:`Client`: the service's HTTP API as typed methods (submit, get, list, cancel,
  scale, inject, drills, live streams of metrics and events, model download), returning
  the API's own pydantic models (:mod:`api.schemas`) and raising the exceptions of
  :mod:`elastic_sgd.errors`.
* :func:`run`: train one job without the service, on a local Ray instance.
* :class:`Task`, :class:`TaskContext`: the interface of a user's own training (model,
  data, loss, metrics), as a job's ``task`` names it.

See ``docs/sdk.md`` for a complete example.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from api.schemas import (
    DrillPublic,
    DrillReport,
    EventPublic,
    EventsPage,
    FieldError,
    HealthPublic,
    HistoryPublic,
    JobDetail,
    JobErrorDetail,
    JobList,
    JobPublic,
    MetricPublic,
    MetricsPage,
    ReadyPublic,
)
from core.errors import ElasticSGDError, SpecError
from core.spec import FaultSpec, JobSpec
from core.state import JobState
from elastic_sgd.client import Client
from elastic_sgd.errors import (
    ApiError,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RequestRefused,
    ServerFailed,
    ServiceError,
    ServiceUnreachable,
    TooManyRequests,
    Unauthorized,
    UnexpectedAnswer,
    ValidationFailed,
)
from elastic_sgd.streams import (
    EventUpdate,
    JobSnapshot,
    JobUpdate,
    MetricUpdate,
    StreamEnd,
    StreamItem,
)

if TYPE_CHECKING:
    from actors.tasks import Task, TaskContext, weighted_means
    from elastic_sgd.local import LocalRun, run

# Loaded on first use: the task interface needs torch and a local run needs Ray, while a
# program that only talks to the service (the CLI's status, logs, submit) starts without
# either (2.4 s of imports here)
_LAZY = {
    "Task": "actors.tasks",
    "TaskContext": "actors.tasks",
    "weighted_means": "actors.tasks",
    "LocalRun": "elastic_sgd.local",
    "run": "elastic_sgd.local",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'elastic_sgd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "ApiError",
    "Client",
    "Conflict",
    "DrillPublic",
    "DrillReport",
    "ElasticSGDError",
    "EventPublic",
    "EventUpdate",
    "EventsPage",
    "FaultSpec",
    "FieldError",
    "Forbidden",
    "HealthPublic",
    "HistoryPublic",
    "JobDetail",
    "JobErrorDetail",
    "JobList",
    "JobPublic",
    "JobSnapshot",
    "JobSpec",
    "JobState",
    "JobUpdate",
    "LocalRun",
    "MetricPublic",
    "MetricUpdate",
    "MetricsPage",
    "NotFound",
    "PayloadTooLarge",
    "ReadyPublic",
    "RequestRefused",
    "ServerFailed",
    "ServiceError",
    "ServiceUnreachable",
    "SpecError",
    "StreamEnd",
    "StreamItem",
    "Task",
    "TaskContext",
    "TooManyRequests",
    "Unauthorized",
    "UnexpectedAnswer",
    "ValidationFailed",
    "run",
    "weighted_means",
]
