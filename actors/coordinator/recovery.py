"""Recovery: checkpoints, the journal, and the files a restarted coordinator reads.

A job with a state folder keeps there

* ``checkpoints/``: atomic, checksummed snapshots (:mod:`actors.checkpoint`) of everything
  needed to continue: the model of record and optimizer, the counters, the monitor, the
  samplers' positions, which one-shot faults fired (:class:`CheckpointState`);
* ``journal.jsonl``: every record and event, so a restarted coordinator replays the run's
  history and keeps its clock (:meth:`Recovery.replay_journal`);
* ``members.json``: which worker incarnations are live (a restarted coordinator re-attaches
  to them, they outlive it);
* ``fired.json``: one-shot faults fired after the last checkpoint (a coordinator crash must
  not fire again after the restart).

Nothing here decides what to do: :class:`Recovery` reads and writes, the loop acts.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from actors.checkpoint import (
    Journal,
    Loaded,
    drop_after,
    latest_valid,
    oldest_valid,
    write_checkpoint,
)
from actors.coordinator.reporting import Reporter
from core.events import Event, EventKind, FaultKind, Record, record_from_dict
from core.spec import CheckpointSpec


@dataclass
class CheckpointState:
    """What a checkpoint holds (the keys of the stored dict are these field names)."""

    x: torch.Tensor
    opt: dict[str, Any]
    step: int
    version: int
    samples: int
    workers: list[int]
    samplers: dict[int, dict[str, Any]]
    fired: list[str]
    resizes: int
    monitor: tuple[float, int, float]  # (b_max, count, total)
    norms: dict[str, float]
    elapsed_s: float
    residuals: dict[int, np.ndarray]
    torch_rng: torch.Tensor
    refused: int
    dropped: int
    corrupted: int  # replies the injector marked corrupted
    refused_nonfinite: int  # gradients refused for a NaN or an infinite entry
    t0: float
    steps_all_lost: int = 0  # steps whose every gradient was lost
    # the guard's state: frozen constants, the first loss, the (possibly tightened) mode
    # setting; empty in checkpoints written before the guard existed
    guard: dict[str, Any] = field(default_factory=dict)
    # the live workers' averaged floating buffers (BatchNorm statistics; docs/tasks.md),
    # None for a model without any (and in checkpoints written before buffers were kept)
    buffers: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointState:
        return cls(
            x=d["x"],
            opt=d["opt"],
            step=int(d["step"]),
            version=int(d["version"]),
            samples=int(d["samples"]),
            workers=[int(w) for w in d["workers"]],
            samplers={int(k): v for k, v in d["samplers"].items()},
            fired=list(d["fired"]),
            resizes=int(d["resizes"]),
            monitor=(
                float(d["monitor"][0]),
                int(d["monitor"][1]),
                float(d["monitor"][2]),
            ),
            norms=dict(d["norms"]),
            elapsed_s=float(d["elapsed_s"]),
            residuals=dict(d["residuals"]),
            torch_rng=d["torch_rng"],
            refused=int(d["refused"]),
            dropped=int(d["dropped"]),
            # absent from checkpoints written before the corrupt fault existed
            corrupted=int(d.get("corrupted", 0)),
            refused_nonfinite=int(d.get("refused_nonfinite", 0)),
            t0=float(d["t0"]),
            guard=dict(d.get("guard") or {}),
            steps_all_lost=int(d.get("steps_all_lost", 0)),  # absent before it was counted
            buffers=d.get("buffers"),
        )


@dataclass
class JournalReplay:
    """What the journal of earlier incarnations says.

    Attributes:
        t0: the job's start (its clock continues), ``None`` for an empty journal.
        items: its records and events, in order.
        crash_step: the step of the last injected coordinator crash, else the last step
            recorded (``None``: nothing recorded).
        restarts: restarts so far, this one included.
    """

    t0: float | None
    items: list[Event | Record] = field(default_factory=list)
    crash_step: int | None = None
    restarts: int = 1

    def steps_redone(self, checkpoint_step: int) -> int:
        """Steps trained before the crash that a resume from ``checkpoint_step`` trains
        again (the coordinator's event and the service's say this same number)."""
        if self.crash_step is None:
            return 0
        return max(self.crash_step - checkpoint_step, 0)


def replay_journal(state_dir: Path) -> JournalReplay:
    """Read the journal the earlier incarnations of a job's coordinator left in
    ``state_dir`` (read only: the service calls it too, to word a resume)."""
    entries = Journal.read(state_dir / "journal.jsonl")
    if not entries:
        return JournalReplay(t0=None)
    # keep the job's clock: time_s continues across the restart
    out = JournalReplay(t0=float(entries[0]["wall_time"]) - float(entries[0]["time_s"]))
    for e in entries:
        out.items.append(Event.from_dict(e) if "detail" in e else record_from_dict(e))
    events = [i for i in out.items if isinstance(i, Event)]
    out.crash_step = max(
        (
            e.step
            for e in events
            if e.kind is EventKind.FAULT and e.fault is FaultKind.COORDINATOR_CRASH
        ),
        default=None,
    )
    if out.crash_step is None:  # not an injected crash: the last step the journal recorded
        out.crash_step = max((r.step for r in out.items if not isinstance(r, Event)), default=None)
    out.restarts = 1 + sum(1 for e in events if e.kind is EventKind.RESTART)
    return out


@dataclass
class Resumed:
    """What a resume found.

    Attributes:
        workers: the ids to bring back.
        samplers: their samplers' states, from the checkpoint.
        state: the checkpoint to restore (``None``: none valid, start from step 0).
        t0: the job's start, from the journal.
        restarts: restarts so far, this one included.
        steps_lost: steps done after the checkpoint, lost with the crash.
        fired: one-shot faults fired after the checkpoint.
    """

    workers: list[int]
    samplers: dict[int, dict[str, Any]]
    state: CheckpointState | None
    t0: float | None
    restarts: int
    steps_lost: int
    fired: set[str]


class Recovery:
    """The job's state folder (``None``: a job that cannot be resumed).

    Args:
        state_dir: the folder.
        policy: the spec's checkpoint intervals and how many to keep.
    """

    def __init__(self, state_dir: Path | None, policy: CheckpointSpec) -> None:
        self.state_dir = state_dir
        self.policy = policy
        self.journal = Journal(state_dir / "journal.jsonl") if state_dir is not None else None
        self.last_ckpt_step = 0
        self.last_ckpt_t = time.time()
        self.last_cost_s = 0.0  # the last write's cost (the floor on the interval)
        self.floor_said = False
        self.notes: list[str] = []  # what the caller should say in events (taken by it)

    @property
    def ckpt_dir(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / "checkpoints"

    @staticmethod
    def reconstructed() -> bool:
        """True when Ray restarted this actor after its process died."""
        try:
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
        except Exception:  # noqa: BLE001 - outside an actor
            return False

    # -- checkpoints ---------------------------------------------------------------------
    def checkpoint_due(self, step: int) -> bool:
        """Whether the spec's interval says a checkpoint is due at ``step``, and the floor
        (``checkpoint.max_time_share`` of the wall time) lets it be written now."""
        c = self.policy
        if self.ckpt_dir is None or (c.interval_steps is None and c.interval_s is None):
            return False
        since_s = time.time() - self.last_ckpt_t
        due = (c.interval_steps is not None and step - self.last_ckpt_step >= c.interval_steps) or (
            c.interval_s is not None and since_s >= c.interval_s
        )
        floor_s = self.last_cost_s / c.max_time_share
        if due and since_s < floor_s:
            if not self.floor_said:
                self.floor_said = True
                self.notes.append(
                    f"checkpoints are spaced at least {floor_s:.3f} s apart: one costs "
                    f"{self.last_cost_s * 1e3:.1f} ms and checkpoint.max_time_share is "
                    f"{c.max_time_share} (the spec's interval asks for more often)"
                )
            return False
        return due

    def write(self, state: CheckpointState, build_s: float = 0.0) -> Path:
        """Write ``state`` atomically; its cost (``build_s``, the time it took to gather
        ``state``, plus the write) sets the floor on the next interval."""
        assert self.ckpt_dir is not None
        t = time.perf_counter()
        path = write_checkpoint(self.ckpt_dir, state.step, state.to_dict(), self.policy.keep)
        self.last_ckpt_step, self.last_ckpt_t = state.step, time.time()
        self.last_cost_s = build_s + time.perf_counter() - t
        return path

    def latest(self) -> tuple[Loaded | None, CheckpointState | None]:
        """The latest valid checkpoint (its file and what it holds), if any."""
        assert self.ckpt_dir is not None
        loaded = latest_valid(self.ckpt_dir)
        if loaded is None:
            return None, None
        self.last_ckpt_step = loaded.step
        return loaded, CheckpointState.from_dict(loaded.state)

    def rollback_target(
        self, step: int, margin: int
    ) -> tuple[Loaded | None, CheckpointState | None, list[str]]:
        """Where a rollback at ``step`` returns: the newest valid checkpoint at least
        ``margin`` steps older (one just before a divergence may hold a model already on its
        way out: its step's loss was measured at a staler, healthier view), else the oldest
        kept. The checkpoints after it belong to the abandoned trajectory and are deleted
        (a restart must not resume it); their names are returned."""
        assert self.ckpt_dir is not None
        loaded = latest_valid(self.ckpt_dir, at_most=step - margin) or oldest_valid(self.ckpt_dir)
        if loaded is None:
            return None, None, []
        dropped = drop_after(self.ckpt_dir, loaded.step)
        self.last_ckpt_step = loaded.step
        return loaded, CheckpointState.from_dict(loaded.state), dropped

    # -- the journal ---------------------------------------------------------------------
    def replay_journal(self) -> JournalReplay:
        assert self.state_dir is not None
        return replay_journal(self.state_dir)

    def resume(self, reporter: Reporter, n_workers: int) -> Resumed:
        """Replay the journal into ``reporter`` and load the latest valid checkpoint (the
        events of a restart are recorded); the loop restores what it returns."""
        replay = self.replay_journal()
        if replay.t0 is not None:
            reporter.t0 = replay.t0
        for item in replay.items:
            reporter.replay(item)
        loaded, st = self.latest()
        for why in loaded.skipped if loaded else []:
            reporter.event(EventKind.CHECKPOINT, f"skipped invalid checkpoint {why}")
        out = Resumed(
            list(range(n_workers)),
            {},
            st,
            replay.t0,
            replay.restarts,
            0,
            self.load_fired(),
        )
        if loaded is None or st is None:
            reporter.event(
                EventKind.RESTART,
                "coordinator restarted; no valid checkpoint: from step 0",
            )
            return out
        out.steps_lost = replay.steps_redone(st.step)
        reporter.event(
            EventKind.RESTART,
            f"coordinator restarted from {loaded.path.name} (step "
            f"{st.step}); {out.steps_lost} steps lost since the checkpoint",
            target="coordinator",
            step=st.step,
        )
        out.workers, out.samplers = list(st.workers) or out.workers, st.samplers
        return out

    def flush(self) -> None:
        if self.journal is not None:
            self.journal.flush()

    # -- members and fired faults --------------------------------------------------------
    def _write_json(self, name: str, value: Any) -> None:
        assert self.state_dir is not None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / f".{name}.tmp"
        tmp.write_text(json.dumps(value))
        os.replace(tmp, self.state_dir / name)

    def save_members(self, members: dict[int, int]) -> None:
        """Which worker incarnations (id -> generation) are live."""
        if self.state_dir is not None:
            self._write_json("members.json", {str(k): v for k, v in members.items()})

    def load_members(self) -> dict[int, int]:
        if self.state_dir is None or not (self.state_dir / "members.json").exists():
            return {}
        raw = json.loads((self.state_dir / "members.json").read_text())
        return {int(k): int(v) for k, v in raw.items()}

    def save_fired(self, fired: set[str]) -> None:
        """One-shot faults that fired (the restarted coordinator must not fire them again)."""
        if self.state_dir is not None:
            self._write_json("fired.json", sorted(fired))

    def load_fired(self) -> set[str]:
        if self.state_dir is None or not (self.state_dir / "fired.json").exists():
            return set()
        return set(json.loads((self.state_dir / "fired.json").read_text()))
