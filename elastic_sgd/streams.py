"""Reading a job's live stream (``GET /jobs/{id}/stream``, server-sent events) as typed items.

The service sends four kinds of message (:mod:`api.streams`): ``job`` (the job's state and
progress: :class:`~api.schemas.JobPublic` without ``updated_at``), ``metrics`` (a JSON array
of :class:`~api.schemas.MetricPublic`, in ``seq`` order), ``event`` (an
:class:`~api.schemas.EventPublic`), and a final ``end`` once the job is terminal and
everything it wrote was sent. Each ``metrics`` and ``event`` carries, as its SSE ``id``, the
*cursor* just after it (``<seq>:<event id>``): sent back as ``Last-Event-ID``, it resumes the
stream exactly there, nothing lost and nothing twice. :class:`elastic_sgd.Client` does that
by itself when a stream breaks off; it hands out a ``metrics`` message record by record,
each with the cursor just after that record.

This module is the pure part: :class:`SSEParser` turns lines into messages, and
:func:`items_of` turns a message into :class:`StreamItem` s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime

from pydantic import TypeAdapter

from api.schemas import EventPublic, JobPublic, MetricPublic
from core.state import JobState


class JobSnapshot(JobPublic):
    """A ``job`` message: the API's :class:`~api.schemas.JobPublic` as the stream sends it,
    without ``updated_at`` (the stream sends a job only when something else changed)."""

    updated_at: datetime | None = None  # type: ignore[assignment]


@dataclass(frozen=True)
class JobUpdate:
    """The job's state or progress changed."""

    job: JobSnapshot


@dataclass(frozen=True)
class MetricUpdate:
    """A new metric record; ``cursor`` resumes the stream just after it."""

    metric: MetricPublic
    cursor: str


@dataclass(frozen=True)
class EventUpdate:
    """A new event; ``cursor`` resumes the stream just after it."""

    event: EventPublic
    cursor: str


@dataclass(frozen=True)
class StreamEnd:
    """The job ended in ``state`` and every record and event it wrote was sent."""

    state: JobState


StreamItem = JobUpdate | MetricUpdate | EventUpdate | StreamEnd


@dataclass(frozen=True)
class SSEMessage:
    """One server-sent event: its ``event`` name, ``data`` (lines joined) and ``id``."""

    event: str
    data: str
    id: str | None = None


@dataclass
class SSEParser:
    """Server-sent events from lines of text, as the HTML standard reads them.

    Feed it the stream's lines (without their line ends) one at a time; a blank line
    ends a message, which :meth:`feed` then returns. Comments (``: ping``) and unknown
    fields are skipped.
    """

    _event: str = ""
    _data: list[str] = field(default_factory=list)
    _id: str | None = None

    def feed(self, line: str) -> SSEMessage | None:
        """Take one line; returns the message it completes, if it completes one."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        return None

    def _dispatch(self) -> SSEMessage | None:
        if not self._data and not self._event:
            return None
        msg = SSEMessage(self._event or "message", "\n".join(self._data), self._id)
        self._event, self._data, self._id = "", [], None
        return msg


_RECORDS: TypeAdapter[list[MetricPublic]] = TypeAdapter(list[MetricPublic])


def items_of(msg: SSEMessage) -> list[StreamItem]:
    """The typed items of a stream message (none for a kind this client does not know, so
    that a newer service can add kinds); a ``metrics`` message gives one
    :class:`MetricUpdate` per record, its cursor the record's ``seq`` and the message's
    event id.

    Raises:
        pydantic.ValidationError: the message's data is not what its kind promises.
        ValueError: an ``end`` whose data is not JSON, or names no known state; a
            ``metrics`` message whose id is not a cursor.
    """
    if msg.event == "job":
        return [JobUpdate(JobSnapshot.model_validate_json(msg.data))]
    if msg.event == "metrics":
        _, sep, after_id = (msg.id or "").partition(":")
        if not sep or not after_id.isdigit():
            raise ValueError(f"a 'metrics' message's id {msg.id!r} is not '<seq>:<event id>'")
        return [MetricUpdate(r, f"{r.seq}:{after_id}") for r in _RECORDS.validate_json(msg.data)]
    if msg.event == "event":
        return [EventUpdate(EventPublic.model_validate_json(msg.data), msg.id or "")]
    if msg.event == "end":
        return [StreamEnd(JobState(json.loads(msg.data)["state"]))]
    return []
