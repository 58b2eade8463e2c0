"""elastic_sgd.Client against a real service (uvicorn subprocess, real Ray, loopback).

One small digits job with ``tensorboard: true`` is submitted, followed on the live stream
to its end, read back (``get``, ``metrics``, ``history``), its model downloaded and loaded,
its TensorBoard event files read with TensorBoard's reader, and its stream resumed from a
cursor; a slow job is followed live and cancelled; refusals come back as typed errors (a
422 with the refused fields, a 401 without the token, a 403 with a wrong one, a 404); and
the complete example of docs/sdk.md runs as written.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import REPO, SMALL_SPEC, Server, wait_for
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from core.state import JobState
from elastic_sgd import (
    Client,
    Conflict,
    EventUpdate,
    Forbidden,
    JobUpdate,
    MetricUpdate,
    NotFound,
    StreamEnd,
    Unauthorized,
    ValidationFailed,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

TOKEN = "sdk-e2e-token-0123456789abcdef"


@pytest.fixture(scope="module")
def server(make_server: Callable[..., Server]) -> Server:
    return make_server(token=TOKEN)


@pytest.fixture
def client(server: Server) -> Client:
    return Client(server.url, TOKEN)


def test_submit_stream_get_download_and_tensorboard(server: Server, client: Client) -> None:
    assert client.health().status == "ok" and client.ready().status == "ready"
    job = client.submit({**SMALL_SPEC, "name": "sdk-small", "tensorboard": True})
    assert job.state is JobState.PENDING and job.spec["tensorboard"] is True

    items = list(client.stream(job.id))
    assert isinstance(items[-1], StreamEnd) and items[-1].state is JobState.SUCCEEDED
    steps = [
        i.metric.step for i in items if isinstance(i, MetricUpdate) and i.metric.kind == "step"
    ]
    assert steps == list(range(1, 61))  # every step, once, in order
    assert any(isinstance(i, EventUpdate) and i.event.kind == "membership" for i in items)
    jobs = [i.job for i in items if isinstance(i, JobUpdate)]  # a 60-step job may skip running
    assert (jobs[-1].state, jobs[-1].step) == (JobState.SUCCEEDED, 60)

    done = client.get(job.id)
    assert done.state is JobState.SUCCEEDED and done.step == 60 and done.summary is not None
    evals = client.metrics(job.id, kind="eval").items
    assert evals and all(m.test_accuracy is not None for m in evals)
    history = client.history(job.id)
    assert history.steps.items[-1].step == 60 and not history.steps.thinned

    # resumed from a cursor in the middle: only what came after it
    cursors = [i for i in items if isinstance(i, MetricUpdate)]
    middle = cursors[len(cursors) // 2]
    rest = [i for i in client.stream(job.id, last_event_id=middle.cursor)]
    seqs = [i.metric.seq for i in rest if isinstance(i, MetricUpdate)]
    assert seqs and seqs[0] > middle.metric.seq
    assert seqs == [i.metric.seq for i in cursors if i.metric.seq > middle.metric.seq]

    saved = torch.load(io.BytesIO(client.model_bytes(job.id)), weights_only=True)
    weights = saved["state_dict"]
    assert weights and all(isinstance(t, torch.Tensor) for t in weights.values())
    assert saved["step"] == 60 and saved["spec"]["name"] == "sdk-small"

    # the job's folder has its metrics as TensorBoard event files
    log_dir = server.state_dir / "runs" / job.id / "tensorboard"
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 61))
    by_step = {m.step: m.loss for m in client.metrics(job.id, kind="step", limit=100).items}
    assert all(e.value == pytest.approx(by_step[e.step], rel=1e-6) for e in loss)
    tb_acc = acc.Scalars("eval/test_accuracy")
    assert [(e.step, pytest.approx(e.value)) for e in tb_acc] == [
        (m.step, m.test_accuracy) for m in evals
    ]
    assert "consistency/b_hat" in acc.Tags()["scalars"]


def test_follow_a_live_job_then_cancel_it(client: Client, tmp_path: Path) -> None:
    slow = {**SMALL_SPEC, "name": "sdk-slow", "steps": 100_000}
    slow["faults"] = [{"kind": "delay", "delay_ms": 25.0}]  # ~25 ms a step: it stays live
    job = client.submit(slow)
    seen = []
    for m in client.stream_metrics(job.id):
        seen.append(m.step)
        if len(seen) >= 3:
            break
    assert seen == sorted(seen) and len(seen) == 3
    # the live model of record, while it trains (records may come before the service's
    # supervisor has seen the job running)
    wait_for(lambda: client.get(job.id).state is JobState.RUNNING, 60, what="job running")
    path = client.download_model(job.id, tmp_path / "live.pt")
    assert torch.load(path, weights_only=True)["state_dict"]
    assert client.cancel(job.id).id == job.id
    ended = client.wait(job.id, timeout_s=60, interval_s=0.25)
    assert ended.state is JobState.CANCELLED
    with pytest.raises(Conflict):
        client.scale(job.id, 2)


def test_refusals_are_typed_errors(server: Server, client: Client) -> None:
    with pytest.raises(ValidationFailed) as bad:
        client.submit({**SMALL_SPEC, "batch_size": 0, "mode": {"name": "elastic", "beta": 2}})
    paths = {e.path for e in bad.value.errors}
    assert "batch_size" in paths and any(p.startswith("mode") for p in paths), paths
    assert bad.value.status == 422

    with Client(server.url) as anonymous, pytest.raises(Unauthorized) as no_token:
        anonymous.submit(SMALL_SPEC)
    assert "bearer token" in no_token.value.detail
    with Client(server.url, "not-the-token") as wrong, pytest.raises(Forbidden):
        wrong.cancel("0123456789ab")
    with pytest.raises(NotFound):
        client.get("0123456789ab")
    with Client(server.url) as anonymous:  # reads need no token
        assert anonymous.list(limit=5).total >= 1


def doc_example() -> str:
    """The first Python block after "## A complete example" in docs/sdk.md."""
    text = (REPO / "docs" / "sdk.md").read_text()
    section = text.split("## A complete example", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_docs_example_runs_as_written(server: Server) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "ESGD_URL": server.url, "ESGD_TOKEN": TOKEN}
    r = subprocess.run(
        [sys.executable, "-c", doc_example()],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ready" in r.stdout and "ended: succeeded" in r.stdout
    assert "step 60: loss" in r.stdout
    assert "batch_size: " in r.stdout  # the refused field of the 422
