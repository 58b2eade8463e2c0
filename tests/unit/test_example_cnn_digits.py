"""Unit tests for the cnn_digits example task: shapes, BatchNorm buffers and dropout, the
seeded split, and one training step moving the running statistics."""

from __future__ import annotations

import pytest
import torch
from cnn_digits.task import DigitsParams, DigitsTask, build, split_digits
from pydantic import ValidationError

from actors.tasks.base import Task, TaskContext

pytestmark = pytest.mark.unit

CTX = TaskContext(seed=0, worker_id=0, data_dir=None, device=torch.device("cpu"))


def test_model_has_batchnorm_buffers_and_dropout() -> None:
    task = build(DigitsParams())
    assert isinstance(task, Task) and isinstance(task, DigitsTask)
    model = task.build_model()
    buffers = dict(model.named_buffers())
    assert {"features.1.running_mean", "features.1.running_var"} <= set(buffers)
    assert {"features.4.running_mean", "features.4.running_var"} <= set(buffers)
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == 2
    # the count in the module docstring and configs/cnn_digits.yaml
    assert sum(p.numel() for p in model.parameters()) == 38_378


def test_samples_and_batches() -> None:
    task = build(DigitsParams())
    train = task.train_data(CTX)
    image, label = train[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert label.dtype == torch.int64 and 0 <= int(label) < 10
    batch = task.collate([train[i] for i in range(16)])
    model = task.build_model()
    assert model(batch[0]).shape == (16, 10)
    loss = task.loss(model, batch)
    assert loss.ndim == 0 and float(loss.detach()) > 0
    acc = task.metrics(model, batch)["accuracy"]
    assert 0.0 <= acc <= 1.0


def test_split_is_seeded_disjoint_and_complete() -> None:
    tr, te = split_digits(0, 0.2)
    assert len(tr) + len(te) == 1797 and len(te) == 359
    pix = {bytes(tr.pixels[i].numpy()) + bytes([int(tr.labels[i])]) for i in range(len(tr))}
    pix_te = {bytes(te.pixels[i].numpy()) + bytes([int(te.labels[i])]) for i in range(len(te))}
    # digits has a handful of duplicate images; the splits share no index, so at most those
    assert len(pix & pix_te) <= 5
    tr2, _ = split_digits(0, 0.2)
    assert torch.equal(tr.pixels, tr2.pixels)
    tr3, _ = split_digits(1, 0.2)
    assert not torch.equal(tr.pixels, tr3.pixels)


def test_a_training_step_moves_the_running_statistics_and_eval_uses_them() -> None:
    task = build(DigitsParams())
    torch.manual_seed(0)
    model = task.build_model().train()
    train = task.train_data(CTX)
    batch = task.collate([train[i] for i in range(32)])
    before = model.features[1].running_mean.clone()
    task.loss(model, batch).backward()
    assert not torch.equal(before, model.features[1].running_mean)
    assert int(model.features[1].num_batches_tracked) == 1
    model.eval()
    with torch.no_grad():
        a, b = model(batch[0]), model(batch[0])
    assert torch.equal(a, b)  # eval: running statistics, no dropout


def test_params_are_validated() -> None:
    with pytest.raises(ValidationError, match="channels"):
        DigitsParams(channels=0)
    with pytest.raises(ValidationError, match="test_fraction"):
        DigitsParams(test_fraction=1.0)
