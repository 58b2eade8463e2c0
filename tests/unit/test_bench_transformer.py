"""Unit tests for bench/transformer.py's pure parts: the jobs it runs, time to the target
loss, the memory report's own-shard check, and the table's verdicts."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from gpt_bytes.data import ProcessReads
from gpt_bytes.task import GPTParams, build

from actors.sampler import make_shards
from actors.tasks.base import TaskContext
from bench import transformer as tb
from bench.common import Run
from bench.plain_task import PlainJob

pytestmark = pytest.mark.unit


def test_jobs_are_the_config_with_the_benchmark_settings() -> None:
    j = tb.job("elastic", seed=2, steps=30, eval_interval=10, delay_ms=50.0)
    assert j["task"]["entrypoint"] == "gpt_bytes.task:build"
    assert j["task"]["params"]["max_eval_windows"] == tb.EVAL_WINDOWS
    assert j["mode"] == tb.MODES["elastic"] and j["seed"] == 2 and j["steps"] == 30
    assert j["workers"] * j["batch_size"] * tb.tokens_per_sample() == 2048
    (fault,) = j["faults"]
    assert fault["workers"] == [tb.STRAGGLER] and fault["distribution"] == "exponential"
    assert "faults" not in tb.job("sync", 0, 30, 10)
    # the plain reference reads the same job
    plain = PlainJob.model_validate(tb.job("sync", 0, 30, 31))
    assert plain.optimizer.name == "adamw" and plain.workers == 2


def _run(losses: list[tuple[int, float, float]]) -> Run:
    recs: list[dict[str, Any]] = [
        {"kind": "eval", "step": s, "wall_time": t, "test_loss": loss, "seq": i}
        for i, (s, t, loss) in enumerate(losses)
    ]
    return Run(summary={}, records=recs)


def test_time_to_loss() -> None:
    run = _run([(0, 100.0, 5.5), (10, 110.0, 3.0), (20, 125.0, 2.4), (30, 130.0, 2.3)])
    assert tb.time_to_loss(run, 2.5) == (25.0, 20)
    assert tb.time_to_loss(run, 1.0) == (None, None)
    assert tb.final_loss(run) == 2.3


def test_each_seed_chases_its_own_sync_runs_final_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    # seed 1's sync run ends higher (2.9) than seed 0's (2.7): against seed 0's target seed 1
    # would never arrive; against its own every mode that gets as low is timed
    final = {0: 2.7, 1: 2.9}

    def fake_run_job(spec: dict[str, Any]) -> Run:
        seed = spec["seed"]
        late = 5.0 if spec["mode"]["name"] == "sync" else 0.0
        run = _run([(0, 0.0, 5.5), (10, 10.0 + late, 3.5), (20, 20.0 + late, final[seed])])
        run.summary = {
            "consistency": {"b_hat_max": 0.0, "b_hat_mean": 0.0, "bound": 1.0},
            "wall_seconds": 20.0,
        }
        run.records.append({"kind": "step", "step": 1, "wall_time": 0.0, "seq": 9})
        return run

    monkeypatch.setattr(tb, "run_job", fake_run_job)
    monkeypatch.setattr(tb, "mean_step_ms", lambda _run: 100.0)
    st = tb.measure_straggler(2, 20, 10)
    assert st["target_losses"] == pytest.approx([2.7 * 1.02, 2.9 * 1.02])
    sync, elastic = st["modes"]["sync"]["runs"], st["modes"]["elastic"]["runs"]
    assert [r["time_to_target_s"] for r in sync] == [25.0, 25.0]
    assert [r["time_to_target_s"] for r in elastic] == [20.0, 20.0]
    assert st["elastic_over_sync"] == pytest.approx(0.8)


def test_memory_report_flags_a_read_outside_the_shard() -> None:
    train = build(GPTParams()).train_data(TaskContext(0, 0, None, torch.device("cpu")))
    shards = make_shards(len(train), tb.WORKERS, 0)
    own = [
        ProcessReads("w0", "train", 1, frozenset(shards[0][:5].tolist()), 5, 400 * 1024),
        ProcessReads("w1", "train", 2, frozenset(shards[1][:3].tolist()), 3, 500 * 1024),
        ProcessReads("coord", "val", 3, frozenset({0, 1}), 2, 600 * 1024),
    ]
    rep = tb.memory_report(own, seed=0)
    assert rep["only_own_shard"]
    assert rep["workers"]["w1"]["peak_rss_mib"] == 500 and rep["workers"]["w0"]["windows_read"] == 5
    assert rep["dataset_object_bytes"] < rep["workers"]["w0"]["shard_bytes"] / 10
    stray = int(shards[1][0])
    bad = [*own, ProcessReads("w0", "train", 4, frozenset({stray}), 1, None)]
    rep = tb.memory_report(bad, seed=0)
    assert not rep["only_own_shard"] and rep["workers"]["w0"]["read_outside_shard"] == 1


def test_render_states_every_verdict() -> None:
    mem = {
        "workers": {
            "w0": {
                "peak_rss_mib": 400.0,
                "windows_read": 5,
                "shard_windows": 9,
                "shard_bytes": 9 * 257,
                "read_outside_shard": 0,
            },
        },
        "dataset_object_bytes": 1000,
        "train_stream_bytes": 10_000,
        "only_own_shard": True,
    }
    run = {"steady_tokens_per_s": 900.0, "b_hat_max": 0.0, "bound": 0.0, "memory": mem}
    straggler_run = {
        "time_to_target_s": 10.0,
        "step_at_target": 30,
        "final_loss": 2.0,
        "mean_step_ms": 500.0,
        "b_hat_mean": 0.1,
        "bound": 1.0,
    }
    payload: dict[str, Any] = {
        "machine": {
            "command": "python -m bench.transformer",
            "date": "d",
            "cpu_count": 2,
            "platform": "p",
            "python": "3.11",
            "torch": "t",
            "ray": "r",
            "git": "g",
        },
        "load_before": [0.1, 0.1, 0.1],
        "load_after": [1.0, 1.0, 1.0],
        "repeats": 1,
        "plain_only": False,
        "throughput": {
            tb.PLAIN: {
                "median_tokens_per_s": 1000.0,
                "ratio_to_plain": 1.0,
                "runs": [{"steady_tokens_per_s": 1000.0}],
            },
            "sync": {"median_tokens_per_s": 920.0, "ratio_to_plain": 0.92, "runs": [run]},
            "elastic": {"median_tokens_per_s": 900.0, "ratio_to_plain": 0.90, "runs": [run]},
            "straggler": {"median_tokens_per_s": 910.0, "ratio_to_plain": 0.91, "runs": [run]},
        },
        "straggler": {
            "calibration": {"delay_ms": 500.0, "final_loss": 2.0},
            "target_losses": [2.04],
            "modes": {
                "sync": {"median_s": 20.0, "runs": [straggler_run]},
                "elastic": {"median_s": 10.0, "runs": [straggler_run]},
                "straggler": {"median_s": 8.0, "runs": [straggler_run]},
            },
            "elastic_over_sync": 0.5,
            "straggler_over_sync": 0.4,
        },
    }
    text = tb.render(payload)
    assert "sync >= 0.9x plain: 0.92x (met)" in text
    assert "elastic >= 0.95x plain: 0.90x (missed)" in text
    assert "elastic <= 0.6x sync's time to the target loss: 0.50x (met)" in text
    assert "the straggler mode (no target of its own): 0.40x sync's time" in text
    assert "every worker read only its shard: yes" in text
    assert "| sync | w0 | 400 | 5 / 9 | 0 |" in text
    assert "Target validation loss per seed: that seed's sync run's final x 1.02 (2.0400)" in text


def test_a_plain_only_table_has_no_verdicts() -> None:
    payload: dict[str, Any] = {
        "machine": {
            "command": "c",
            "date": "d",
            "cpu_count": 2,
            "platform": "p",
            "python": "3.11",
            "torch": "t",
            "ray": "r",
            "git": "g",
        },
        "load_before": [0.1, 0.1, 0.1],
        "load_after": [0.1, 0.1, 0.1],
        "repeats": 1,
        "plain_only": True,
        "throughput": {
            tb.PLAIN: {
                "median_tokens_per_s": 1000.0,
                "ratio_to_plain": 1.0,
                "runs": [{"steady_tokens_per_s": 1000.0}],
            }
        },
    }
    text = tb.render(payload)
    assert "| plain PyTorch | 1000 | 1.00 |" in text and "Targets" not in text
