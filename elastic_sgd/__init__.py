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

from actors.tasks import Task, TaskContext, weighted_means
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
from elastic_sgd.local import LocalRun, run
from elastic_sgd.streams import (
    EventUpdate,
    JobSnapshot,
    JobUpdate,
    MetricUpdate,
    StreamEnd,
    StreamItem,
)

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
