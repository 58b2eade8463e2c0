"""Unit tests for actors/coordinator/recovery.py and faulting.py (no Ray): a checkpoint
round trip, what a journal replay yields (clock, history, crash step, restarts), members and
fired-fault files, when a checkpoint is due; and the fault decisions the loop acts on
(drops, partitions and heartbeats, corruption windows, injections)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.coordinator.faulting import TASK_ERROR_REPEATS, Faulting, TaskErrors, corruption_text
from actors.coordinator.recovery import CheckpointState, Recovery
from actors.coordinator.reporting import Reporter
from actors.coordinator.slot import WorkerSlot
from actors.faults import CorruptOn, ReplyVerdict
from actors.messages import GradientReply
from core.events import EventKind, FaultKind
from core.spec import CheckpointSpec, FaultSpec, parse_spec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def _state(step: int = 40) -> CheckpointState:
    return CheckpointState(
        x=torch.arange(5, dtype=torch.float32),
        opt={"buf": torch.ones(5), "steps": step},
        step=step,
        version=step * 4,
        samples=step * 128,
        workers=[0, 2],
        samplers={0: {"epoch": 1, "pos": 3}, 2: {"epoch": 0, "pos": 9}},
        fired=["crash:0:1"],
        resizes=1,
        monitor=(0.7, 12, 3.5),
        norms={"grad_max": 2.0, "raw_grad_max": 2.0, "update_max": 0.0, "lost_fraction_max": 0.0},
        elapsed_s=12.5,
        residuals={0: np.ones(5, dtype=np.float32)},
        torch_rng=torch.get_rng_state(),
        refused=3,
        dropped=1,
        corrupted=2,
        refused_nonfinite=1,
        t0=1000.0,
    )


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    rec = Recovery(tmp_path, CheckpointSpec(interval_steps=10, interval_s=None))
    path = rec.write(_state())
    assert rec.last_ckpt_step == 40
    loaded, st = Recovery(tmp_path, CheckpointSpec()).latest()
    assert loaded is not None and loaded.path == path and st is not None
    want = _state()
    assert torch.equal(st.x, want.x) and torch.equal(st.opt["buf"], want.opt["buf"])
    assert (st.step, st.version, st.samples, st.workers) == (40, 160, 5120, [0, 2])
    assert st.samplers == want.samplers and st.fired == want.fired
    assert st.monitor == (0.7, 12, 3.5) and st.norms == want.norms
    assert np.array_equal(st.residuals[0], want.residuals[0])
    assert (st.refused, st.dropped, st.t0) == (3, 1, 1000.0)
    assert (st.corrupted, st.refused_nonfinite) == (2, 1)


def test_a_checkpoint_from_before_the_corrupt_fault_loads_with_zero_counts() -> None:
    old = _state().to_dict()
    del old["corrupted"], old["refused_nonfinite"]
    st = CheckpointState.from_dict(old)
    assert (st.corrupted, st.refused_nonfinite, st.dropped) == (0, 0, 1)


def test_no_checkpoint_yields_none(tmp_path: Path) -> None:
    assert Recovery(tmp_path, CheckpointSpec()).latest() == (None, None)


def test_a_rollback_returns_margin_steps_back_and_deletes_the_abandoned_checkpoints(
    tmp_path: Path,
) -> None:
    rec = Recovery(tmp_path, CheckpointSpec(interval_steps=5, interval_s=None, keep=3))
    for step in (30, 35, 40):
        rec.write(_state(step))
    # diverged at 42: 40 is within the margin of 5 (it may hold a model on its way out), 35
    # is not; 40 is deleted so neither a later rollback nor a restart resumes it
    loaded, st, dropped = rec.rollback_target(42, margin=5)
    assert loaded is not None and st is not None and (loaded.step, st.step) == (35, 35)
    assert dropped == ["ckpt-0000000040.pt"] and rec.last_ckpt_step == 35
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [f"ckpt-00000000{s}.{x}" for s in (30, 35) for x in ("pt", "sha256")]
    assert rec.latest()[0].step == 35  # type: ignore[union-attr]
    # every kept one is within the margin: the oldest
    loaded, _, dropped = rec.rollback_target(36, margin=10)
    assert loaded is not None and loaded.step == 30 and dropped == ["ckpt-0000000035.pt"]
    # margin 0: the newest at or before the step
    assert rec.rollback_target(30, margin=0)[0].step == 30  # type: ignore[union-attr]


def test_a_rollback_skips_a_corrupt_checkpoint_and_finds_none_in_an_empty_folder(
    tmp_path: Path,
) -> None:
    rec = Recovery(tmp_path, CheckpointSpec(interval_steps=5, interval_s=None, keep=3))
    assert rec.rollback_target(10, margin=5) == (None, None, [])
    rec.write(_state(10))
    bad = rec.write(_state(20))
    bad.write_bytes(b"torn")
    loaded, _, _ = rec.rollback_target(30, margin=5)
    assert loaded is not None and loaded.step == 10
    assert loaded.skipped and "checksum mismatch" in loaded.skipped[0]


def test_checkpoint_due_by_steps_or_seconds(tmp_path: Path) -> None:
    rec = Recovery(tmp_path, CheckpointSpec(interval_steps=10, interval_s=None))
    assert not rec.checkpoint_due(9) and rec.checkpoint_due(10)
    by_time = Recovery(tmp_path, CheckpointSpec(interval_steps=None, interval_s=0.01))
    by_time.last_ckpt_t = time.time() - 1.0
    assert by_time.checkpoint_due(0)
    assert not Recovery(None, CheckpointSpec(interval_steps=1)).checkpoint_due(100)


def test_a_costly_checkpoint_spaces_the_next_out_and_says_so_once(tmp_path: Path) -> None:
    """The floor: a checkpoint that cost 50 ms at max_time_share 0.1 holds the next one
    back for 0.5 s, whatever ``interval_steps: 1`` asks; the note is said once."""
    rec = Recovery(tmp_path, CheckpointSpec(interval_steps=1, interval_s=None, max_time_share=0.1))
    rec.write(_state(1), build_s=0.05)
    assert rec.last_cost_s >= 0.05
    assert not rec.checkpoint_due(2) and not rec.checkpoint_due(3)
    assert len(rec.notes) == 1 and "checkpoint.max_time_share is 0.1" in rec.notes[0]
    rec.last_ckpt_t = time.time() - rec.last_cost_s / 0.1 - 0.1  # the floor has passed
    assert rec.checkpoint_due(4)
    assert len(rec.notes) == 1  # said once
    # a cheap checkpoint leaves the spec's interval as it is
    cheap = Recovery(tmp_path / "b", CheckpointSpec(interval_steps=1, interval_s=None))
    cheap.last_cost_s = 0.0
    assert cheap.checkpoint_due(1) and not cheap.notes


def test_journal_replay_keeps_the_clock_and_finds_the_crash(tmp_path: Path) -> None:
    rec = Recovery(tmp_path, CheckpointSpec())
    rep = Reporter(500.0, rec.journal, lambda: 17)
    rep.event(EventKind.STATE, "starting -> running")
    rep.step_record(loss=0.3, samples=10, b_hat=0.0, b_hat_max=0.0, bound=0.0, workers=2, refused=0)
    rep.event(EventKind.FAULT, "crash", target="coordinator", fault=FaultKind.COORDINATOR_CRASH)
    rep.event(EventKind.RESTART, "restarted")
    rec.flush()
    replay = Recovery(tmp_path, CheckpointSpec()).replay_journal()
    assert replay.t0 == pytest.approx(500.0)
    assert [i.seq for i in replay.items] == [1, 2, 3, 4]
    assert replay.crash_step == 17
    assert replay.restarts == 2  # one before, this one


def test_members_and_fired_files(tmp_path: Path) -> None:
    rec = Recovery(tmp_path, CheckpointSpec())
    assert rec.load_members() == {} and rec.load_fired() == set()
    rec.save_members({0: 2, 3: 0})
    rec.save_fired({"coordinator_crash:0", "crash:1:2"})
    assert rec.load_members() == {0: 2, 3: 0}
    assert rec.load_fired() == {"coordinator_crash:0", "crash:1:2"}
    Recovery(None, CheckpointSpec()).save_members({1: 1})  # no folder: nothing, no error


# -- faulting -----------------------------------------------------------------------------


def _faulting(faults: list[dict[str, object]], **spec: object) -> Faulting:
    s = parse_spec({"steps": 50, "workers": 3, "faults": faults, **spec})
    f = Faulting(s, Reporter(time.time(), None, lambda: 0), Recovery(None, s.checkpoint))
    f.bind([0, 1, 2])
    return f


def _slots(n: int = 3) -> list[WorkerSlot]:
    return [
        WorkerSlot(id=i, actor=None, state="busy", t_dispatch=time.perf_counter()) for i in range(n)
    ]


def test_a_planned_drop_is_recorded_and_counted() -> None:
    f = _faulting([{"kind": "drop", "workers": [1], "steps": [3]}])
    w = _slots()[1]
    reply = GradientReply(1, 2, 0.5, 32, 1.0, 1.0)
    assert f.on_reply(w, reply, 0.0) is ReplyVerdict.DELIVER
    reply.step = 3
    assert f.on_reply(w, reply, 0.0) is ReplyVerdict.DROP and f.dropped == 1
    assert f.on_reply(w, None, 0.0) is ReplyVerdict.DELIVER  # a failed call: nothing to lose
    (ev,) = f.reporter.events
    assert (ev.kind, ev.fault, ev.target) == (EventKind.FAULT, FaultKind.DROP, "worker-1")


def test_a_partition_past_the_heartbeat_timeout_loses_the_worker() -> None:
    f = _faulting(
        [{"kind": "partition", "workers": [0], "at_step": 0, "duration_s": 60.0}],
        heartbeat_timeout_s=0.5,
    )
    slots = _slots()
    out = f.tick(0, 0.0, slots, reply_deadline_s=100.0)
    assert slots[0].partition_until is not None and out.lose == []
    assert f.reporter.events[-1].fault is FaultKind.PARTITION
    slots[0].t_partition -= 1.0  # a second of silence > 0.5 s
    out = f.tick(0, 1.0, slots, reply_deadline_s=100.0)
    (loss,) = out.lose
    assert loss.worker is slots[0] and loss.keep_actor and not loss.kill


def test_a_silent_busy_worker_is_lost_and_killed() -> None:
    f = _faulting([])
    slots = _slots()
    slots[2].t_dispatch -= 10.0
    out = f.tick(0, 0.0, slots, reply_deadline_s=f.reply_deadline_s(0.001))
    (loss,) = out.lose
    assert loss.worker is slots[2] and loss.kill
    assert f.reply_deadline_s(1.0) == pytest.approx(20.0)  # 20 round trips past the floor


def test_a_healed_partition_delivers_the_held_reply() -> None:
    f = _faulting([{"kind": "partition", "workers": [0], "at_step": 0, "duration_steps": 2}])
    slots = _slots()
    f.tick(0, 0.0, slots, 100.0)
    held = GradientReply(0, 0, 0.5, 32, 1.0, 1.0)
    slots[0].partition_held = (held, None)
    out = f.tick(2, 0.1, slots, 100.0)  # the window [0, 2) is over
    assert out.deliver == [(slots[0], held, None)] and slots[0].partition_until is None


def test_a_cut_off_workers_replies_are_held() -> None:
    f = _faulting([{"kind": "partition", "workers": [0], "at_step": 0, "duration_steps": 2}])
    slots = _slots()
    reply = GradientReply(0, 0, 0.5, 32, 1.0, 1.0)
    assert f.on_reply(slots[0], reply, 0.0) is ReplyVerdict.DELIVER
    f.tick(0, 0.0, slots, 100.0)
    assert f.on_reply(slots[0], reply, 0.0) is ReplyVerdict.HOLD
    assert f.on_reply(slots[0], None, 0.0) is ReplyVerdict.HOLD  # a failure waits too
    assert f.on_reply(slots[1], reply, 0.0) is ReplyVerdict.DELIVER


def test_a_worker_lost_while_cut_off_is_restarted_when_its_window_ends() -> None:
    f = _faulting([{"kind": "partition", "workers": [1], "at_step": 0, "duration_steps": 3}])
    slots = _slots()
    f.tick(0, 0.0, slots, 100.0)
    slots[1].state = "dead"  # declared lost for want of a heartbeat, actor kept
    assert f.tick(2, 0.1, slots, 100.0).restart == []
    out = f.tick(3, 0.2, slots, 100.0)
    assert out.restart == [slots[1]] and slots[1].partition_until is None
    ev = f.reporter.events[-1]
    assert (ev.kind, ev.fault, ev.target) == (EventKind.HEAL, FaultKind.PARTITION, "worker-1")


def test_a_corruption_window_opening_is_recorded() -> None:
    f = _faulting(
        [
            {
                "kind": "corrupt",
                "workers": [2],
                "corruption": "scale",
                "scale_factor": 10.0,
                "at_step": 1,
                "duration_steps": 3,
            }
        ]
    )
    slots = _slots()
    f.tick(0, 0.0, slots, 100.0)
    assert f.reporter.events == []
    f.tick(1, 0.0, slots, 100.0)
    f.tick(2, 0.0, slots, 100.0)  # still the same window: recorded once
    (ev,) = f.reporter.events
    assert (ev.kind, ev.fault, ev.target) == (EventKind.FAULT, FaultKind.CORRUPT, "worker-2")
    assert ev.detail == "gradient corruption on: scale x10"
    assert corruption_text(CorruptOn(0, "nan", probability=0.1)) == "nan, p=0.1 per gradient"


def test_an_injection_without_trigger_fires_now_and_reaches_every_worker() -> None:
    f = _faulting([])
    slots = _slots()
    f.inject(FaultSpec(kind="crash", workers=[1]), slots, step=12)
    (bound,) = f.plan
    assert bound.spec.at_step == 12 and bound.targets == [1]
    assert all(w.send_plan for w in slots)
    assert f.reporter.events[-1].kind is EventKind.INJECT


def test_the_same_task_error_three_times_is_fatal_a_dead_worker_never() -> None:
    """Ray's own exception types (no Ray instance needed to make them): a computation that
    raised (RayTaskError with its cause and traceback) counts by its type and the line that
    raised it, whatever its message; a dead worker (ActorDiedError) or anything else not."""
    from ray.exceptions import ActorDiedError, RayTaskError

    def raised(msg: str, line: int = 73) -> BaseException:
        tb = (
            'Traceback (most recent call last):\n  File "/ray/worker.py", line 10, in compute\n'
            f'  File "/pkg/task.py", line {line}, in __getitem__\nValueError: {msg}\n'
        )
        return RayTaskError("compute", tb, ValueError(msg)).as_instanceof_cause()

    errs = TaskErrors()
    assert TASK_ERROR_REPEATS == 3
    said, fatal = errs.see(0, raised("sample 7 unreadable"))
    assert fatal is None
    assert said == (
        "the task raised ValueError: sample 7 unreadable (/pkg/task.py:73:__getitem__; the "
        "traceback is in the worker's log)"
    )
    assert errs.see(1, raised("sample 7 unreadable", line=90))[1] is None  # elsewhere: apart
    said, fatal = errs.see(1, ActorDiedError())
    assert fatal is None and said.startswith("ActorDiedError: ")
    assert errs.see(0, OSError("gone")) == ("OSError: gone", None)
    assert errs.see(0, raised("sample 57 unreadable"))[1] is None
    _, fatal = errs.see(2, raised("sample 107 unreadable"))
    assert fatal is not None
    assert "ValueError: sample 107 unreadable" in fatal and "/pkg/task.py:73:__getitem__" in fatal
    assert "3 gradient computations of workers 0, 2" in fatal and "log" in fatal
