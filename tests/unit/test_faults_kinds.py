"""Unit tests for the fault registry and engine (actors/faults/; pure, no Ray).

Every kind is a test input (:class:`Fault`, as hivemind drives its ``FaultyAverager`` by
a ``Fault`` enum): :class:`FakeRun` plays a 4-worker job over 10 steps on a fake clock,
asking the :class:`~actors.faults.FaultEngine` what fires on each tick and on each reply
and each worker's :class:`~actors.faults.WorkerFaults` what happens to its gradient, and
carries the decisions out the way the coordinator does (a killed worker sends nothing
more, a cut-off worker's replies are held, a coordinator crash ends the run). The same
parametrized tests then check, for every kind, that the fault hits its target inside its
window and nothing else, fires its event once, and does not fire again after a restart
from the ``fired`` keys.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import pytest
import torch

from actors.faults import (
    FAULT_TYPES,
    CorruptOn,
    DelayOn,
    FaultEngine,
    GradientVerdict,
    KillCoordinator,
    KillWorker,
    PartitionHeal,
    PartitionStart,
    ReplyVerdict,
    Tick,
    TickAction,
    WorkerFaults,
    bind_plan,
    fault_type,
    fault_types,
    screen_gradient,
)
from core.events import FaultKind
from core.spec import FaultSpec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

WORKERS = [0, 1, 2, 3]
STEPS = 10
STEP_S = 0.1  # the fake clock: step k happens at k x 0.1 s
TARGET = 1  # the worker every fault below hits
WINDOW = range(5, 8)  # at_step 5, duration_steps 3


class Fault(Enum):
    """The injectable faults, as test inputs."""

    NONE = "none"  # no fault: the baseline every other case differs from
    CRASH = "crash"  # worker 1 is killed at step 5
    DROP = "drop"  # worker 1's replies of steps 5-7 are lost
    DELAY = "delay"  # worker 1 stalls 30 ms on its gradients of steps 5-7
    PARTITION = "partition"  # worker 1 is cut off for steps 5-7
    COORDINATOR_CRASH = "coordinator_crash"  # the coordinator dies at step 5
    CORRUPT_NAN = "corrupt_nan"  # worker 1's gradients of steps 5-7 become NaN
    CORRUPT_INF = "corrupt_inf"  # ... become +inf
    CORRUPT_SCALE = "corrupt_scale"  # ... are scaled by 10 (finite)


WINDOWED: dict[str, Any] = {"workers": [TARGET], "at_step": 5, "duration_steps": 3}
SPECS: dict[Fault, dict[str, Any]] = {
    Fault.CRASH: {"kind": "crash", "workers": [TARGET], "at_step": 5},
    Fault.DROP: {"kind": "drop", **WINDOWED},
    Fault.DELAY: {"kind": "delay", "delay_ms": 30.0, **WINDOWED},
    Fault.PARTITION: {"kind": "partition", **WINDOWED},
    Fault.COORDINATOR_CRASH: {"kind": "coordinator_crash", "at_step": 5},
    Fault.CORRUPT_NAN: {"kind": "corrupt", "corruption": "nan", **WINDOWED},
    Fault.CORRUPT_INF: {"kind": "corrupt", "corruption": "inf", **WINDOWED},
    Fault.CORRUPT_SCALE: {
        "kind": "corrupt",
        "corruption": "scale",
        "scale_factor": 10.0,
        **WINDOWED,
    },
}
# what each kind's one firing looks like (its tick action at step 5)
FIRST_ACTION: dict[Fault, TickAction | None] = {
    Fault.NONE: None,
    Fault.CRASH: KillWorker(TARGET, None),
    Fault.DROP: None,  # decided on the receive path, no tick action
    Fault.DELAY: DelayOn(TARGET, "constant", 30.0),
    Fault.PARTITION: PartitionStart(TARGET),
    Fault.COORDINATOR_CRASH: KillCoordinator(5),
    Fault.CORRUPT_NAN: CorruptOn(TARGET, "nan"),
    Fault.CORRUPT_INF: CorruptOn(TARGET, "inf"),
    Fault.CORRUPT_SCALE: CorruptOn(TARGET, "scale", 10.0),
}


@dataclass(frozen=True)
class Outcome:
    """What became of one worker's gradient of one step."""

    verdict: ReplyVerdict = ReplyVerdict.DELIVER
    delay_s: float = 0.0
    screened: GradientVerdict = GradientVerdict.ACCEPT
    scale: float = 1.0  # the gradient (all ones) arrived as ``scale`` x ones


@dataclass
class FakeRun:
    """A 4-worker job on a fake clock that carries out what the engine decides."""

    specs: list[FaultSpec]
    seed: int = 0
    fired: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.plan = bind_plan(self.specs, WORKERS, self.seed)
        self.engine = FaultEngine(self.plan, self.seed, set(self.fired))
        self.workers = {w: WorkerFaults(self.plan, w, self.seed) for w in WORKERS}
        self.live = list(WORKERS)
        self.cut_off: set[int] = set()
        self.actions: list[tuple[int, TickAction]] = []
        self.outcomes: dict[tuple[int, int], Outcome] = {}
        self.crashed_at: int | None = None

    def act(self, step: int, action: TickAction) -> None:
        self.actions.append((step, action))
        if isinstance(action, KillCoordinator):
            self.crashed_at = step
        elif isinstance(action, KillWorker):
            self.live.remove(action.worker)
        elif isinstance(action, PartitionStart):
            self.cut_off.add(action.worker)
        elif isinstance(action, PartitionHeal):
            self.cut_off.discard(action.worker)

    def play(self, steps: int = STEPS) -> FakeRun:
        for step in range(steps):
            t_s = step * STEP_S
            for action in self.engine.tick(
                Tick(step, t_s, list(self.live), frozenset(self.cut_off))
            ):
                self.act(step, action)
            if self.crashed_at is not None:
                return self
            for w in self.live:
                self.outcomes[step, w] = self.reply(w, step, t_s)
        return self

    def reply(self, w: int, step: int, t_s: float) -> Outcome:
        effect = self.workers[w].on_gradient(step, t_s)
        grad = torch.ones(4)
        for c in effect.corruptions:
            c.apply(grad)
        verdict = self.engine.on_reply(w, step, t_s, w in self.cut_off)
        screened = screen_gradient(grad)
        scale = float(grad[0]) if screened is GradientVerdict.ACCEPT else 1.0
        return Outcome(verdict, effect.delay_s, screened, scale)


def run(fault: Fault, **kw: Any) -> FakeRun:
    specs = [] if fault is Fault.NONE else [FaultSpec(**SPECS[fault])]
    return FakeRun(specs, **kw).play()


def expected(fault: Fault, step: int, worker: int) -> Outcome | None:
    """The outcome the plan should produce (None: no reply, the sender is gone)."""
    if fault is Fault.COORDINATOR_CRASH and step >= 5:
        return None
    if worker != TARGET:
        return Outcome()
    if fault is Fault.CRASH:
        return None if step >= 5 else Outcome()
    if step not in WINDOW:
        return Outcome()
    return {
        Fault.DROP: Outcome(verdict=ReplyVerdict.DROP),
        Fault.DELAY: Outcome(delay_s=0.03),
        Fault.PARTITION: Outcome(verdict=ReplyVerdict.HOLD),
        Fault.CORRUPT_NAN: Outcome(screened=GradientVerdict.REFUSE_NONFINITE),
        Fault.CORRUPT_INF: Outcome(screened=GradientVerdict.REFUSE_NONFINITE),
        Fault.CORRUPT_SCALE: Outcome(scale=10.0),
    }.get(fault, Outcome())


# -- every kind, the same tests -----------------------------------------------------------


@pytest.mark.parametrize("fault", list(Fault))
def test_a_fault_hits_its_target_in_its_window_and_nothing_else(fault: Fault) -> None:
    r = run(fault)
    for step in range(STEPS):
        for w in WORKERS:
            assert r.outcomes.get((step, w)) == expected(fault, step, w), (fault, step, w)


@pytest.mark.parametrize("fault", list(Fault))
def test_a_fault_fires_once_when_its_window_opens(fault: Fault) -> None:
    r = run(fault)
    first = FIRST_ACTION[fault]
    if fault is Fault.PARTITION:  # the window has an end the coordinator must act on
        assert r.actions == [(5, PartitionStart(TARGET)), (8, PartitionHeal(TARGET))]
    elif first is None:
        assert r.actions == []
    else:
        assert r.actions == [(5, first)]


@pytest.mark.parametrize("fault", list(Fault))
def test_a_restarted_engine_does_not_fire_a_fired_fault_again(fault: Fault) -> None:
    """The ``fired`` keys (checkpointed) keep one-shot firings from repeating; windows
    that are not one-shot (drop, partition, the worker's own stall and corruption) replay
    the same way."""
    before = run(fault)
    after = run(fault, fired=before.engine.fired)
    one_shot = (KillWorker, KillCoordinator, DelayOn, CorruptOn)
    assert not [a for _, a in after.actions if isinstance(a, one_shot)]
    if fault not in (Fault.CRASH, Fault.COORDINATOR_CRASH):
        assert after.outcomes == before.outcomes


@pytest.mark.parametrize("fault", list(Fault))
def test_a_plan_replays_the_same_way_under_its_seed(fault: Fault) -> None:
    a, b = run(fault, seed=3), run(fault, seed=3)
    assert a.actions == b.actions and a.outcomes == b.outcomes


FIRED_KEYS = {
    Fault.CRASH: {"crash:0:1"},
    Fault.DROP: {"drop:0:1"},
    Fault.DELAY: {"delay:0:1"},
    Fault.PARTITION: set(),
    Fault.COORDINATOR_CRASH: {"coordinator_crash:0"},
    Fault.CORRUPT_NAN: {"corrupt:0:1"},
    Fault.NONE: set(),
}


@pytest.mark.parametrize("fault", list(FIRED_KEYS))
def test_fired_keys_keep_the_checkpoint_format(fault: Fault) -> None:
    """Checkpoints written before the registry hold these keys; they must still match."""
    assert run(fault).engine.fired == FIRED_KEYS[fault]


# -- the registry ---------------------------------------------------------------------------


def test_every_spec_kind_has_its_class() -> None:
    kinds = typing.get_args(FaultSpec.model_fields["kind"].annotation)
    assert {FaultKind(k) for k in kinds} == set(FAULT_TYPES)
    for kind, cls in FAULT_TYPES.items():
        assert cls.kind is kind
        assert type(fault_type(kind.value)) is cls
    # "external" is recorded (a kill from outside), never injected
    assert FaultKind.EXTERNAL not in FAULT_TYPES
    with pytest.raises(KeyError):
        fault_type(FaultKind.EXTERNAL)


def test_kinds_are_asked_in_one_fixed_order() -> None:
    order = [t.kind for t in fault_types()]
    assert len({t.order for t in fault_types()}) == len(order)
    # a coordinator crash ends the tick before anything else fires; a partition holds a
    # reply before a drop is drawn for it
    assert order[0] is FaultKind.COORDINATOR_CRASH
    assert order.index(FaultKind.PARTITION) < order.index(FaultKind.DROP)


# -- the engine -----------------------------------------------------------------------------


def _engine(*specs: dict[str, Any], seed: int = 0) -> FaultEngine:
    return FaultEngine(bind_plan([FaultSpec(**s) for s in specs], WORKERS, seed), seed)


def test_a_coordinator_crash_ends_the_tick_and_leaves_other_faults_unfired() -> None:
    e = _engine(
        {"kind": "crash", "workers": [2], "at_step": 5},
        {"kind": "coordinator_crash", "at_step": 5},
    )
    assert e.tick(Tick(5, 0.5, WORKERS)) == [KillCoordinator(5)]
    # the crash was not marked fired: the restarted coordinator still fires it
    assert e.fired == {"coordinator_crash:1"}
    assert e.tick(Tick(5, 0.5, WORKERS)) == [KillWorker(2)]


def test_a_crash_spares_workers_that_are_not_live_and_plans_the_rejoin() -> None:
    e = _engine({"kind": "crash", "workers": [1, 2], "at_step": 3, "rejoin_after_s": 0.5})
    assert e.tick(Tick(3, 0.3, [0, 2, 3])) == [KillWorker(2, 0.5)]
    assert e.tick(Tick(4, 0.4, [0, 1, 3])) == [KillWorker(1, 0.5)]
    assert e.tick(Tick(5, 0.5, WORKERS)) == []


def test_a_probabilistic_crash_draws_once_per_step() -> None:
    e = _engine({"kind": "crash", "workers": [0], "probability": 0.5}, seed=1)
    fired_at = []
    for step in range(40):
        for _ in range(3):  # several ticks per step: one draw
            if e.tick(Tick(step, 0.0, WORKERS)):
                fired_at.append(step)
    assert len(fired_at) == 1  # once fired, never again
    # p = 0.5 per step: 40 steps without a firing has probability 2^-40
    assert fired_at[0] < 40


def test_a_held_reply_draws_nothing_for_a_drop() -> None:
    e = _engine(
        {"kind": "partition", "workers": [0], "at_step": 0, "duration_steps": 99},
        {"kind": "drop", "probability": 0.5},
    )
    state = e.memo.rng.bit_generator.state
    assert e.on_reply(0, 3, 0.0, cut_off=True) is ReplyVerdict.HOLD
    assert e.memo.rng.bit_generator.state == state
    # a failed call (no step) carries no gradient: nothing to drop, nothing drawn
    assert e.on_reply(1, None, 0.0, cut_off=False) is ReplyVerdict.DELIVER
    assert e.memo.rng.bit_generator.state == state


def test_a_probabilistic_drop_draws_once_per_step_and_worker() -> None:
    e = _engine({"kind": "drop", "probability": 0.5}, seed=2)
    verdicts = [e.on_reply(0, 7, 0.0, cut_off=False) for _ in range(5)]
    # the first reply of step 7 decides; a second reply of the same step is not redrawn
    assert verdicts[1:] == [ReplyVerdict.DELIVER] * 4
    drops = sum(
        e.on_reply(w, s, 0.0, False) is ReplyVerdict.DROP for s in range(500) for w in WORKERS
    )
    # 2,000 draws at p = 0.5: the standard deviation of the count is ~22
    assert 850 < drops < 1150


def test_drop_at_exact_steps_and_once_after_a_time() -> None:
    e = _engine(
        {"kind": "drop", "workers": [0], "steps": [2, 4]},
        {"kind": "drop", "workers": [1], "at_s": 1.0},
    )
    got0 = [s for s in range(6) if e.on_reply(0, s, 0.0, False) is ReplyVerdict.DROP]
    assert got0 == [2, 4]
    got1 = [t for t in (0.5, 1.0, 1.5, 2.0) if e.on_reply(1, 9, t, False) is ReplyVerdict.DROP]
    assert got1 == [1.0]


def test_a_worker_lost_while_cut_off_heals_when_its_window_ends() -> None:
    e = _engine({"kind": "partition", "workers": [2], "at_s": 1.0, "duration_s": 2.0})
    assert e.tick(Tick(0, 0.5, WORKERS)) == []
    assert e.tick(Tick(1, 1.0, WORKERS)) == [PartitionStart(2)]
    # declared lost for want of a heartbeat: no longer live, still cut off
    assert e.tick(Tick(2, 2.5, [0, 1, 3], frozenset({2}))) == []
    assert e.tick(Tick(3, 3.0, [0, 1, 3], frozenset({2}))) == [PartitionHeal(2)]


def test_overlapping_partitions_heal_when_the_last_window_ends() -> None:
    e = _engine(
        {"kind": "partition", "workers": [1], "at_step": 2, "duration_steps": 2},
        {"kind": "partition", "workers": [1], "at_step": 3, "duration_steps": 3},
    )
    cut: set[int] = set()
    log = []
    for step in range(8):
        for a in e.tick(Tick(step, 0.0, WORKERS, frozenset(cut))):
            log.append((step, a))
            if isinstance(a, PartitionStart):
                cut.add(a.worker)
            elif isinstance(a, PartitionHeal):
                cut.discard(a.worker)
    assert log == [(2, PartitionStart(1)), (6, PartitionHeal(1))]


def test_an_injected_fault_fires_from_the_running_plan() -> None:
    e = _engine()
    assert e.tick(Tick(10, 1.0, WORKERS)) == []
    (bound,) = bind_plan([FaultSpec(kind="crash", workers=[3], at_step=10)], WORKERS, 0)
    e.add(bound)
    assert e.tick(Tick(10, 1.0, WORKERS)) == [KillWorker(3)]
    assert e.plan[-1] is bound


def test_a_probabilistic_corruption_opens_its_window_at_once() -> None:
    e = _engine({"kind": "corrupt", "workers": [0], "corruption": "nan", "probability": 0.1})
    assert e.tick(Tick(0, 0.0, WORKERS)) == [CorruptOn(0, "nan", None, 0.1)]
