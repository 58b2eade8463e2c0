"""elastic_sgd.run and ``elastic-sgd run --tensorboard`` on local Ray: a tiny digits job
trains to its end, leaves its files, and its TensorBoard event files hold the same losses
as its metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from cli.main import app
from elastic_sgd import JobState, run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

# Digits, 1 worker, a small MLP, 20 steps: a second of training once the actors are up.
TINY: dict[str, Any] = {
    "name": "sdk-run",
    "model": {"name": "mlp", "hidden": [16]},
    "dataset": {"name": "digits"},
    "workers": 1,
    "steps": 20,
    "batch_size": 32,
    "eval_interval": 10,
    "mode": {"name": "sync"},
}


def records(metrics_path: Path, kind: str) -> list[dict[str, Any]]:
    recs = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    return [r for r in recs if r["kind"] == kind]


def losses_of(metrics_path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(metrics_path, "step")}


def scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_run_trains_without_the_service_and_writes_tensorboard(tmp_path: Path) -> None:
    done = run(TINY, tmp_path / "run", tensorboard=True)
    assert done.state is JobState.SUCCEEDED and done.succeeded
    assert done.summary["steps"] == 20
    assert torch.load(done.model_path, weights_only=True)["state_dict"]
    losses = losses_of(done.metrics_path)
    assert sorted(losses) == list(range(1, 21))
    assert done.tensorboard_dir == tmp_path / "run" / "tensorboard"
    got = scalars(done.tensorboard_dir, "train/loss")
    assert [st for st, _ in got] == list(range(1, 21))
    assert all(v == pytest.approx(losses[st], rel=1e-6) for st, v in got)
    evals = [(r["step"], r["test_accuracy"]) for r in records(done.metrics_path, "eval")]
    assert len(evals) >= 2
    got_evals = scalars(done.tensorboard_dir, "eval/test_accuracy")
    assert [(st, pytest.approx(v)) for st, v in got_evals] == evals


def test_the_cli_run_flag_asks_for_tensorboard(tmp_path: Path) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({**TINY, "name": "cli-run"}))
    out = tmp_path / "out"
    got = CliRunner().invoke(app, ["run", str(spec), "--out", str(out), "--quiet", "--tensorboard"])
    assert got.exit_code == 0, got.output
    assert "tensorboard --logdir" in got.output
    assert [st for st, _ in scalars(out / "tensorboard", "train/loss")] == list(range(1, 21))
    # without the flag (and the spec's tensorboard false): no event files
    plain = tmp_path / "plain"
    got = CliRunner().invoke(app, ["run", str(spec), "--out", str(plain), "--quiet"])
    assert got.exit_code == 0, got.output
    assert not (plain / "tensorboard").exists()
