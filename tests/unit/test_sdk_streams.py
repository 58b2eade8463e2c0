"""Unit tests of the SDK's stream reading: server-sent events parsed as the standard says,
typed into items, and a stream that breaks off resumed from its last cursor with
Last-Event-ID (the service is faked with httpx.MockTransport)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from core.state import JobState
from elastic_sgd import (
    Client,
    EventUpdate,
    JobUpdate,
    MetricUpdate,
    NotFound,
    ServiceUnreachable,
    StreamEnd,
    UnexpectedAnswer,
)
from elastic_sgd.streams import SSEMessage, SSEParser, items_of

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

JOB = {
    "id": "j-1",
    "name": "api",
    "state": "running",
    "terminal": False,
    "created_at": "2026-01-01T00:00:00Z",
    "started_at": None,
    "finished_at": None,
    "step": 3,
    "total_steps": 10,
    "progress": 0.3,
    "workers": [{"id": 0, "state": "alive", "node": None, "step": 3}],
    "b_hat_max": 0.5,
    "b_hat_mean": 0.1,
    "bound": 2.0,
    "error": None,
    "drill_id": None,
}


def metric(seq: int) -> dict[str, Any]:
    return {"seq": seq, "kind": "step", "step": seq, "loss": 1.0 / seq, "b_hat": 0.1}


def event(eid: int) -> dict[str, Any]:
    return {
        "id": eid,
        "source": "runner",
        "seq": None,
        "wall_time": "2026-01-01T00:00:01Z",
        "time_s": 1.0,
        "step": 1,
        "kind": "membership",
        "target": "worker-0",
        "detail": "joined",
    }


def sse(kind: str, data: Any, cursor: str | None = None) -> str:
    head = f"event: {kind}\n" + ("" if cursor is None else f"id: {cursor}\n")
    return head + f"data: {json.dumps(data)}\n\n"


def parse(text: str) -> list[SSEMessage]:
    p = SSEParser()
    return [m for line in text.split("\n") if (m := p.feed(line)) is not None]


def test_the_parser_reads_events_ids_multiline_data_and_skips_comments() -> None:
    text = ': ping\n\nevent: metric\nid: 3:0\ndata: {"a":\ndata:1}\n\ndata: plain\n\n'
    got = parse(text)
    assert got == [SSEMessage("metric", '{"a":\n1}', "3:0"), SSEMessage("message", "plain")]


def test_messages_become_typed_items_and_unknown_kinds_are_skipped() -> None:
    msgs = parse(
        sse("job", JOB)
        + sse("metrics", [metric(4), metric(5)], "5:0")
        + sse("event", event(7), "5:7")
        + sse("future-kind", {"x": 1})
        + 'event: end\ndata: {"state":"succeeded"}\n\n'
    )
    items = [items_of(m) for m in msgs]
    [job], [m4, m5], [e], unknown, [end] = items
    assert isinstance(job, JobUpdate) and job.job.step == 3 and job.job.updated_at is None
    # one item per record, each with the cursor just after it
    assert isinstance(m4, MetricUpdate) and m4.metric.seq == 4 and m4.cursor == "4:0"
    assert isinstance(m5, MetricUpdate) and m5.metric.seq == 5 and m5.cursor == "5:0"
    assert isinstance(e, EventUpdate) and e.event.id == 7 and e.cursor == "5:7"
    assert unknown == []
    assert end == StreamEnd(JobState.SUCCEEDED)


def test_a_metrics_message_without_a_cursor_is_refused() -> None:
    for bad_id in (None, "7", "7:x"):
        with pytest.raises(ValueError, match="'metrics' message's id"):
            items_of(SSEMessage("metrics", json.dumps([metric(7)]), bad_id))


def test_a_stream_that_breaks_off_resumes_from_its_last_cursor() -> None:
    asked: list[tuple[str | None, dict[str, str]]] = []

    def answer(req: httpx.Request) -> httpx.Response:
        asked.append((req.headers.get("Last-Event-ID"), dict(req.url.params)))
        if len(asked) == 1:  # the service drops this reader after two records
            body = sse("job", JOB) + sse("metrics", [metric(1)], "1:0")
            body += sse("event", event(2), "1:2")
        else:
            body = sse("metrics", [metric(2)], "2:2") + 'event: end\ndata: {"state":"failed"}\n\n'
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    c = Client("http://esgd.test", transport=httpx.MockTransport(answer))
    items = list(c.stream("j-1", after_seq=0))
    assert [type(i).__name__ for i in items] == [
        "JobUpdate",
        "MetricUpdate",
        "EventUpdate",
        "MetricUpdate",
        "StreamEnd",
    ]
    assert asked[0] == (None, {"after_seq": "0", "after_id": "0"})
    assert asked[1][0] == "1:2"  # Last-Event-ID: the cursor after the last item received
    c2 = Client("http://esgd.test", transport=httpx.MockTransport(answer))
    asked.clear()
    assert [m.seq for m in c2.stream_metrics("j-1")] == [1, 2]


def test_a_stream_that_keeps_breaking_gives_up_and_a_404_is_raised_at_once() -> None:
    calls = []

    def empty(_req: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(200, text=": ping\n\n")

    c = Client("http://esgd.test", transport=httpx.MockTransport(empty))
    with pytest.raises(ServiceUnreachable, match="broke off 2 times"):
        list(c.stream("j-1", reconnects=1))
    assert len(calls) == 2

    body = {"detail": "no job j-9", "errors": [], "errors_omitted": 0}
    gone = Client(
        "http://esgd.test", transport=httpx.MockTransport(lambda _r: httpx.Response(404, json=body))
    )
    with pytest.raises(NotFound, match="no job j-9"):
        list(gone.stream_events("j-9"))


def test_a_message_that_is_not_the_apis_is_an_unexpected_answer() -> None:
    bad = sse("metrics", [{"kind": "step"}], "1:0")  # no seq, no step
    c = Client(
        "http://esgd.test", transport=httpx.MockTransport(lambda _r: httpx.Response(200, text=bad))
    )
    with pytest.raises(UnexpectedAnswer, match="'metrics' message"):
        list(c.stream("j-1"))
