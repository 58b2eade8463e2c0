"""Unit tests for bench/plain_task.py, the plain-PyTorch reference for any task: it feeds
the samples a synchronous job's workers draw, in their order; its schedule, parameter
groups and entrypoint loading; one step is plain gradient descent on the global batch; a
run is deterministic and learns (tiny settings, a few seconds)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from gpt_bytes.task import GPTParams
from pydantic import ValidationError

from actors.sampler import ShardSampler, make_shards
from actors.tasks.base import TaskContext
from bench.plain_task import (
    Optimizer,
    PlainJob,
    PlainSetupError,
    Schedule,
    TaskRef,
    load_task,
    lr_factor,
    main,
    make_optimizer,
    param_groups,
    sample_order,
    train_plain,
)

pytestmark = pytest.mark.unit

TINY_GPT = {
    "n_layer": 1,
    "n_head": 2,
    "n_embd": 16,
    "block_size": 16,
    "dropout": 0.0,
    "max_files": 20,
    "max_eval_windows": 32,
}
ADAMW = {
    "name": "adamw",
    "lr": 0.003,
    "betas": [0.9, 0.95],
    "weight_decay": 0.1,
    "schedule": {"name": "warmup_cosine", "warmup_steps": 3},
    "clip_grad_norm": 1.0,
    "no_decay_bias_and_norm": True,
}


def _job(**fields: object) -> PlainJob:
    data: dict[str, object] = {
        "task": {"entrypoint": "gpt_bytes.task:build", "params": TINY_GPT},
        "workers": 2,
        "batch_size": 4,
        "steps": 12,
        "eval_interval": 6,
        "optimizer": ADAMW,
    }
    data.update(fields)
    return PlainJob.model_validate(data)


def test_sample_order_is_the_workers_batches_concatenated() -> None:
    n, p, b, seed = 103, 3, 5, 4
    order = sample_order(n, p, b, seed, steps=50)
    assert order.shape == (50, p * b)
    shards = make_shards(n, p, seed)
    samplers = [ShardSampler(shards[i], seed, shard_key=i) for i in range(p)]
    for k in range(50):
        for i in range(p):
            part = order[k, i * b : (i + 1) * b]
            assert np.array_equal(part, samplers[i].next_batch(b))
            assert set(part.tolist()) <= set(shards[i].tolist())


def test_warmup_cosine_factor() -> None:
    sch = Schedule(name="warmup_cosine", warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_factor(sch, t, 20) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(sch, 4, 20) == pytest.approx(1.0)
    assert lr_factor(sch, 12, 20) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos = 0
    assert lr_factor(sch, 20, 20) == pytest.approx(0.1)
    assert lr_factor(Schedule(), 7, 20) == 1.0
    assert lr_factor(Schedule(name="step", step_size=5, gamma=0.5), 11, 20) == 0.25


def test_param_groups_leave_biases_and_norms_undecayed() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    groups = param_groups(model, Optimizer(weight_decay=0.1, no_decay_bias_and_norm=True))
    by_wd = {g["weight_decay"]: g["params"] for g in groups}
    assert [p.shape for p in by_wd[0.1]] == [torch.Size([4, 3])]
    assert len(by_wd[0.0]) == 3  # linear bias, norm weight, norm bias
    one = param_groups(model, Optimizer(weight_decay=0.1))
    assert len(one) == 1 and len(one[0]["params"]) == 4


def test_load_task_validates_params_and_refuses_bad_entrypoints() -> None:
    task = load_task(TaskRef(entrypoint="gpt_bytes.task:build", params={"n_layer": 3}))
    assert task.params == GPTParams(n_layer=3)  # type: ignore[attr-defined]
    with pytest.raises(ValidationError, match="n_head"):
        load_task(TaskRef(entrypoint="gpt_bytes.task:build", params={"n_head": 0}))
    with pytest.raises(PlainSetupError, match=r"package\.module:attribute"):
        load_task(TaskRef(entrypoint="gpt_bytes.task"))
    with pytest.raises(PlainSetupError, match="no_such_module"):
        load_task(TaskRef(entrypoint="no_such_module:build"))
    with pytest.raises(PlainSetupError, match="not a Task"):
        load_task(TaskRef(entrypoint="builtins:dict", params={}))


def test_one_sgd_step_is_gradient_descent_on_the_global_batch() -> None:
    job = _job(steps=1, optimizer={"name": "sgd", "lr": 0.5})
    task = load_task(job.task)
    got = train_plain(job, task, threads=1)
    train = task.train_data(_ctx())
    torch.manual_seed(job.seed)
    model = task.build_model()
    idx = sample_order(len(train), job.workers, job.batch_size, job.seed, 1)[0]
    batch = task.collate([train[int(i)] for i in idx])
    grads = torch.autograd.grad(task.loss(model, batch), list(model.parameters()))
    want = torch.cat(
        [(p - 0.5 * g).reshape(-1) for p, g in zip(model.parameters(), grads, strict=True)]
    )
    assert torch.allclose(got.params, want.detach(), atol=1e-6)
    assert got.train_losses and len(got.evals) == 2  # the initial model and step 1


def _ctx() -> TaskContext:
    return TaskContext(seed=0, worker_id=0, data_dir=None, device=torch.device("cpu"))


def test_a_run_is_deterministic_learns_and_depends_on_the_sample_order() -> None:
    a, b = train_plain(_job(), threads=1), train_plain(_job(), threads=1)
    assert torch.equal(a.params, b.params)
    assert [e.step for e in a.evals] == [0, 6, 12]
    assert a.final_eval_loss < a.evals[0].loss - 0.3
    assert a.evals[0].loss == pytest.approx(math.log(256), abs=0.1)
    assert a.evals[-1].metrics["bits_per_byte"] == pytest.approx(
        a.final_eval_loss / math.log(2), rel=1e-6
    )
    assert a.tokens_per_sample == 16
    assert a.steady_tokens_per_s == pytest.approx(16 * a.steady_samples_per_s)
    # one worker with the same global batch draws other samples: another model
    c = train_plain(_job(workers=1, batch_size=8), threads=1)
    assert not torch.equal(a.params, c.params)


def test_the_command_line_runs_a_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "job.yaml"
    spec = _job().model_dump()
    cfg.write_text(yaml.safe_dump({**spec, "name": "x", "mode": {"name": "sync"}}))
    assert main([str(cfg), "--steps", "4", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "step     4  eval loss" in out and "tokens/s on 1 threads" in out


def test_unset_optimizer_fields_take_torchs_defaults() -> None:
    model = torch.nn.Linear(2, 2)
    adamw = make_optimizer(model, Optimizer(name="adamw", lr=0.01, betas=None, eps=None))
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.defaults["betas"] == (0.9, 0.999) and adamw.defaults["eps"] == 1e-8
    sgd = make_optimizer(model, Optimizer(name="sgd", momentum=None, nesterov=None))
    assert sgd.defaults["momentum"] == 0.0 and sgd.defaults["nesterov"] is False
