"""What a checkpoint of the coordinator holds, and how the run continues from one.

:func:`take` gathers the run's state (the model of record and its optimizer, the counters,
the B-hat monitor, the samplers, the fired faults, the guard's frozen constants, the averaged
buffers) into a :class:`~actors.coordinator.recovery.CheckpointState`; :func:`restore` puts
one back (a resume; or the guard's rollback, which keeps the constants it froze).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from actors.coordinator.recovery import CheckpointState

if TYPE_CHECKING:
    from actors.coordinator.training import Training


def take(t: Training) -> CheckpointState:
    """The run's state now, for a checkpoint (only the live workers' samplers)."""
    spec = t.spec
    samplers = {
        w.id: {
            **w.sampler,
            "seed": spec.seed,
            "shard_key": w.id,
            "shard": t.members.shards[w.id].tolist(),
        }
        for w in t.members.live()
        if w.sampler is not None
    }
    m = t.monitor
    return CheckpointState(
        x=t.record.x.clone(),
        opt=t.record.opt.state_dict(),
        step=t.mode.step,
        version=t.record.version,
        samples=t.samples,
        workers=sorted(samplers),
        samplers=samplers,
        fired=sorted(t.faults.driver.fired),
        resizes=t.members.resizes,
        monitor=(m.b_max, m.count, m.total),
        norms=vars(t.norms).copy(),
        elapsed_s=time.time() - t.reporter.t0,
        residuals={k: v.copy() for k, v in t.meter.residuals.items()},
        torch_rng=torch.get_rng_state(),
        refused=t.refused,
        dropped=t.faults.dropped,
        corrupted=t.corrupted,
        refused_nonfinite=t.refused_nonfinite,
        steps_all_lost=t.steps_all_lost,
        t0=t.reporter.t0,
        guard=t.guard.state(),
        buffers=t.evaluation.mean_buffers(),
    )


def restore(t: Training, st: CheckpointState, guard_state: bool = True) -> None:
    """Continue from checkpoint ``st``: the model and its optimizer, the counters, the
    monitor, the fired faults, and with ``guard_state`` the frozen constants and the mode's
    setting."""
    t.record.x.copy_(st.x)
    t.evaluation.restore(st.buffers)
    t.record.opt.load_state_dict(st.opt)
    t.record.version, t.samples = st.version, st.samples
    t.faults.driver.fired.update(st.fired)
    t.members.resizes = st.resizes
    m = t.monitor
    m.b_max, m.count, m.total = st.monitor
    for k, v in st.norms.items():
        setattr(t.norms, k, v)
    t.meter.residuals = dict(st.residuals)
    t.refused, t.faults.dropped = st.refused, st.dropped
    t.corrupted, t.refused_nonfinite = st.corrupted, st.refused_nonfinite
    t.steps_all_lost = st.steps_all_lost
    torch.set_rng_state(st.torch_rng)
    t.mode.restore(st.step)
    if guard_state:
        t.guard.load(st.guard)


def roll_back(t: Training, reason: str) -> str | None:
    """The guard's rollback, once the requests in flight are drained: restore a checkpoint
    (written only inside the bound and healthy) at least ``guard.rollback_margin_steps``
    before this step (:meth:`Recovery.rollback_target`) with the mode's stricter setting;
    the frozen constants and the reference loss stay. Returns why it could not (the loop
    then fails the job), else ``None``."""
    new = t.mode.tighten()
    if new is None:
        return f"{reason}; rollback impossible (no stricter setting)"
    loaded, st, dropped = t.recovery.rollback_target(
        t.mode.step, t.spec.guard.rollback_margin_steps
    )
    if loaded is None or st is None:
        return f"{reason}; rollback impossible (no valid checkpoint)"
    old = t.spec.mode
    live = t.members.live()
    for w in live:
        t.mode.leave(w.id)
    restore(t, st, guard_state=False)
    t.mode.retune(new)
    for w in live:
        w.state, w.last_step = "idle", None
        t.mode.join(w.id)
    t.data.invalidate()
    t.guard.rolled_back(loaded.path.name, st.step, old, reason, dropped)
    return None
