"""End to end: a user's own task, in a temporary package that is in none of the repo's
packages and on no worker's import path, reaches the job's actors through Ray's
``runtime_env`` (``ESGD_RUNTIME_ENV_PY_MODULES``), is allowed by ``ESGD_TASK_MODULES``, is
submitted over HTTP to a real server and trains to its target (a model with BatchNorm and
dropout: the averaged buffers are what the evaluation uses); a disallowed or missing
entrypoint is a 422 naming ``task.entrypoint``, a bad param one naming ``task.params.*``;
a task that raises while building its model (in the coordinator) or its data (in the
workers), or in the middle of training (a sample its dataset cannot read, raised again by
every replacement), fails the job within seconds with its own message."""

from __future__ import annotations

import io
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import Server, job_in, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

TASK_SRC = '''
"""A user's task: a BatchNorm + dropout MLP on separable blobs."""
import torch
from pydantic import BaseModel, Field
from torch import nn
from torch.utils.data import TensorDataset
from actors.tasks import Task


class Params(BaseModel):
    width: int = Field(default=16, ge=1, le=256)
    n: int = Field(default=512, ge=16, le=100_000)


class Blobs(Task):
    def __init__(self, params: Params) -> None:
        self.p = params

    def _data(self, seed: int, part: int) -> TensorDataset:
        g = torch.Generator().manual_seed(seed * 2 + part)
        y = torch.randint(0, 2, (self.p.n,), generator=g)
        x = torch.randn(self.p.n, 8, generator=g) + 2.5 * y[:, None].float()
        return TensorDataset(x * 4.0 + 10.0, y)  # far from zero mean: BatchNorm matters

    def build_model(self) -> nn.Module:
        w = self.p.width
        return nn.Sequential(nn.Linear(8, w), nn.BatchNorm1d(w), nn.ReLU(), nn.Dropout(0.2),
                             nn.Linear(w, 2))

    def train_data(self, ctx):
        return self._data(ctx.seed, 0)

    def eval_data(self, ctx):
        return self._data(ctx.seed, 1)

    def loss(self, model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    def metrics(self, model, batch):
        x, y = batch
        return {"acc": float((model(x).argmax(1) == y).float().mean())}


class RaisesInModel(Blobs):
    def build_model(self) -> nn.Module:
        raise ValueError("width 16 is not a power of three, refusing to build")


class RaisesInData(Blobs):
    def train_data(self, ctx):
        raise FileNotFoundError(f"worker {ctx.worker_id}: no shard file under /nowhere")


class _Unreadable(torch.utils.data.Dataset):
    """Every 50th sample cannot be read: the job starts, then the batches that hold one
    raise (on every worker, and on their replacements)."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        if i % 50 == 7:
            raise ValueError(f"sample {i} is unreadable: truncated record")
        return self.inner[i]


class RaisesInBatch(Blobs):
    def train_data(self, ctx):
        return _Unreadable(self._data(ctx.seed, 0))
'''


@pytest.fixture(scope="module")
def user_pkg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    name = f"byo_{uuid.uuid4().hex[:8]}"
    root = tmp_path_factory.mktemp("userpkg") / name
    root.mkdir()
    (root / "__init__.py").write_text(textwrap.dedent(TASK_SRC))
    assert not any(str(root.parent) == p for p in sys.path)  # not importable from here
    yield name, root


@pytest.fixture(scope="module")
def server(make_server: Callable[..., Server], user_pkg: tuple[str, Path]) -> Server:
    name, root = user_pkg
    return make_server(  # type: ignore[no-any-return]
        ESGD_TASK_MODULES=f"actors.tasks,{name}",
        ESGD_RUNTIME_ENV_PY_MODULES=str(root),
    )


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def _spec(entrypoint: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "byo",
        "task": {"entrypoint": entrypoint, "params": {"width": 16}},
        "workers": 2,
        "steps": 80,
        "batch_size": 32,
        "eval_interval": 40,
        "optimizer": {"lr": 0.1, "momentum": 0.9},
        "heartbeat_timeout_s": 30.0,
        **extra,
    }


def test_a_user_task_shipped_by_runtime_env_trains_to_its_target(
    client: httpx.Client, user_pkg: tuple[str, Path]
) -> None:
    name, _ = user_pkg
    r = client.post("/jobs", json=_spec(f"{name}:Blobs"))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    job = wait_for(
        lambda: job_in(client, job_id, {"succeeded", "failed", "cancelled"}),
        180,
        what="the user task's job to end",
    )
    assert job["state"] == "succeeded", job.get("error")
    evals = [
        m for m in client.get(f"/jobs/{job_id}/metrics").json()["items"] if m["kind"] == "eval"
    ]
    last = evals[-1]
    # the task's own metric, as test_<name>, of the evaluation model in eval mode with the
    # workers' averaged running statistics
    assert last["test_acc"] >= 0.9, last
    assert last["test_loss"] < evals[0]["test_loss"]
    # the model file holds the averaged running statistics, not the built ones (0 and 1)
    r = client.get(f"/jobs/{job_id}/model")
    assert r.status_code == 200
    state = torch.load(io.BytesIO(r.content), weights_only=False)["state_dict"]
    assert state["1.running_mean"].abs().max() > 0.1
    assert not torch.allclose(state["1.running_var"], torch.ones(16))


def test_disallowed_missing_and_badly_parametrised_tasks_are_422(
    client: httpx.Client, user_pkg: tuple[str, Path]
) -> None:
    name, _ = user_pkg
    for entrypoint, words in [
        ("os:system", "actors.tasks"),  # not under an allowed prefix: names the prefixes
        (f"{name}.missing:build", "no module"),
        (f"{name}:Nope", "has no attribute"),
    ]:
        r = client.post("/jobs", json=_spec(entrypoint))
        assert r.status_code == 422, r.text
        errors = {e["path"]: e["message"] for e in r.json()["errors"]}
        assert words in errors["task.entrypoint"], errors
    bad = _spec(f"{name}:Blobs")
    bad["task"]["params"] = {"width": 0}
    r = client.post("/jobs", json=bad)
    assert r.status_code == 422
    assert [e["path"] for e in r.json()["errors"]] == ["task.params.width"]


@pytest.mark.parametrize(
    ("cls", "words"),
    [
        ("RaisesInModel", "width 16 is not a power of three"),
        ("RaisesInData", "no shard file under /nowhere"),
        # mid-training: not a lost worker to replace for ever
        ("RaisesInBatch", "is unreadable: truncated record"),
    ],
)
def test_a_task_that_raises_fails_the_job_with_its_message(
    client: httpx.Client, user_pkg: tuple[str, Path], cls: str, words: str
) -> None:
    name, _ = user_pkg
    t0 = time.monotonic()
    r = client.post("/jobs", json=_spec(f"{name}:{cls}"))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    job = wait_for(
        lambda: job_in(client, job_id, {"succeeded", "failed", "cancelled"}),
        90,
        what=f"the job of {cls} to end",
    )
    assert job["state"] == "failed", job
    assert words in (job.get("error") or ""), job
    assert "log" in job["error"]  # where the traceback is
    assert time.monotonic() - t0 < 90
