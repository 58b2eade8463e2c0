"""Unit tests of service.tensorboard: the points each record adds, and event files that
TensorBoard's own reader (EventAccumulator) reads back with the right tags and values,
a run that goes back in steps included."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from core.events import EvalRecord, StepRecord
from service.tensorboard import TensorBoardLog, scalars_of

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def step(seq: int, n: int, loss: float | None = 1.0, bound: float | None = 2.0) -> StepRecord:
    return StepRecord(
        seq=seq,
        step=n,
        time_s=0.1 * n,
        wall_time=1_700_000_000.0 + n,
        loss=loss,
        samples_per_s=640.0,
        samples=64,
        b_hat=0.5,
        b_hat_max=0.75,
        bound=bound,
        workers=2,
    )


def evaluation(seq: int, n: int, acc: float) -> EvalRecord:
    metrics: dict[str, float | None] = {"test_accuracy": acc, "test_loss": 0.5, "test_top5": None}
    return EvalRecord(
        seq=seq, step=n, time_s=0.1 * n, wall_time=1_700_000_000.0 + n, workers=2, metrics=metrics
    )


def read(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return acc


def values(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_points_of_a_step_and_an_eval_record() -> None:
    pts = {s.tag: s.value for s in scalars_of(step(1, 1, loss=0.25))}
    assert pts == {
        "train/loss": 0.25,
        "train/samples_per_s": 640.0,
        "train/workers": 2.0,
        "train/refused": 0.0,
        "consistency/b_hat": 0.5,
        "consistency/b_hat_max": 0.75,
        "consistency/bound": 2.0,
        "consistency/b_hat_to_bound": 0.25,
    }
    # an unknown loss and a bound not stated yet are left out, not drawn as zero
    early = {s.tag for s in scalars_of(step(1, 1, loss=None, bound=None))}
    assert "train/loss" not in early and not early & {
        "consistency/bound",
        "consistency/b_hat_to_bound",
    }
    nan = {s.tag for s in scalars_of(step(1, 1, loss=float("nan")))}
    assert "train/loss" not in nan
    ev = scalars_of(evaluation(2, 20, 0.9))
    assert [(s.tag, s.value, s.step) for s in ev] == [
        ("eval/test_accuracy", 0.9, 20),
        ("eval/test_loss", 0.5, 20),
    ]


def test_event_files_read_back_with_their_tags_steps_and_values(tmp_path: Path) -> None:
    log = TensorBoardLog(tmp_path / "tb")
    log.write([step(1, 1, loss=2.0), step(2, 2, loss=1.5)])
    log.write([step(3, 3, loss=1.0), evaluation(4, 3, 0.8)])  # flushed: readable now
    acc = read(tmp_path / "tb")
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "consistency/b_hat", "consistency/bound", "eval/test_accuracy"} <= tags
    assert values(acc, "train/loss") == [(1, 2.0), (2, 1.5), (3, 1.0)]
    assert values(acc, "eval/test_accuracy") == [(3, pytest.approx(0.8))]
    assert [e.wall_time for e in acc.Scalars("train/loss")] == [
        1_700_000_001.0,
        1_700_000_002.0,
        1_700_000_003.0,
    ]
    log.close()
    log.close()  # idempotent


def test_a_final_eval_at_the_last_step_and_a_write_after_close_keep_every_point(
    tmp_path: Path,
) -> None:
    log = TensorBoardLog(tmp_path / "tb")
    log.write([step(1, 1), step(2, 2, loss=0.5), evaluation(3, 2, 0.7)])
    log.write([evaluation(4, 2, 0.75)])  # the final evaluation shares the last step
    log.close()
    log.write([evaluation(5, 2, 0.8)])  # after close: a new file, nothing hidden
    log.close()
    acc = read(tmp_path / "tb")
    assert values(acc, "train/loss") == [(1, 1.0), (2, 0.5)]
    got = [(st, round(v, 3)) for st, v in values(acc, "eval/test_accuracy")]
    assert got == [(2, 0.7), (2, 0.75), (2, 0.8)]


def test_steps_written_again_replace_the_old_ones(tmp_path: Path) -> None:
    log = TensorBoardLog(tmp_path / "tb")
    log.write([step(i, i, loss=10.0 - i) for i in range(1, 6)])
    # the coordinator restarted from its checkpoint at step 2: steps 3.. come again
    log.write([step(i + 10, i, loss=100.0 + i) for i in range(3, 7)])
    log.close()
    # a new writer on the same folder (the service re-attached) repeats step 6
    again = TensorBoardLog(tmp_path / "tb")
    again.write([step(20, 6, loss=7.0), step(21, 7, loss=8.0)])
    again.close()
    got = values(read(tmp_path / "tb"), "train/loss")
    assert got == [(1, 9.0), (2, 8.0), (3, 103.0), (4, 104.0), (5, 105.0), (6, 7.0), (7, 8.0)]
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 3
