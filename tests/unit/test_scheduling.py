"""Unit tests for actors/scheduling.py (no Ray, no tensors): the step bookkeeping of the
step modes, the sync / straggler / per-block elastic / async rules, and property-based
drives of a StepBook and of the async wait rule under random arrival orders."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.scheduling import (
    AsyncRule,
    BlockShareRule,
    StepBook,
    StepRule,
    StragglerRule,
    SyncRule,
    make_async_rule,
    make_step_rule,
)
from core.spec import AsyncMode, StragglerMode, SyncMode

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]


# -- StepBook -------------------------------------------------------------------------------


def _book(p: int, total: int = 100, jumps: bool = False) -> StepBook:
    book = StepBook(total, jumps=jumps)
    for w in range(p):
        book.join(w)
    return book


def _drain(book: StepBook) -> list[int]:
    """Complete every step that can be completed now; the steps applied, in order."""
    done = []
    while (entry := book.completable()) is not None:
        done.append(entry.step)
        book.complete(entry.step)
    return done


def test_new_workers_start_at_step_zero_then_join_the_frontier() -> None:
    book = _book(2)
    assert book.next_step(0) == 0 and book.next_step(1) == 0
    for w in (0, 1):
        book.assign(w, 0)
    for w in (0, 1):
        assert book.arrive(w, 0)
    assert _drain(book) == [0]
    book.assign(0, 1)
    book.assign(1, 1)
    # a worker joining while step 1 is open is handed step 1 (the frontier), and step 1
    # cannot complete without it
    book.join(2)
    assert book.next_step(2) == 1
    book.arrive(0, 1)
    book.arrive(1, 1)
    assert book.completable() is None
    book.assign(2, 1)
    assert book.completable() is None  # assigned, gradient not yet in
    book.arrive(2, 1)
    assert _drain(book) == [1]
    # a worker joining when every handed-out step is applied starts at the next one
    book.join(3)
    assert book.next_step(3) == 2


def test_step_completes_only_when_closed_and_resolved() -> None:
    book = _book(3)
    book.assign(0, 0)
    book.assign(1, 0)
    book.arrive(0, 0)
    book.arrive(1, 0)
    # resolved (everyone assigned has arrived) but not closed: worker 2 may still join it
    assert book.open[0].resolved
    assert book.completable() is None
    book.assign(2, 0)
    # closed, but not resolved
    assert not book.open[0].resolved
    assert book.completable() is None
    book.arrive(2, 0)
    entry = book.completable()
    assert entry is not None and entry.step == 0
    assert entry.arrived == {0, 1, 2}


def test_steps_complete_in_order() -> None:
    book = _book(2, jumps=True)
    book.assign(0, 0)
    book.assign(1, 0)
    book.arrive(1, 0)
    book.assign(1, 1)  # worker 1 runs ahead (elastic)
    book.arrive(1, 1)
    book.assign(1, 2)
    book.arrive(1, 2)
    # steps 1 is resolved and closed (frontier 2 > 1) but step 0 is not done
    assert book.completable() is None
    with pytest.raises(ValueError, match="in order"):
        book.complete(1)
    book.arrive(0, 0)
    # 0 and 1 complete; 2 is the frontier and worker 0 has not reached it
    assert _drain(book) == [0, 1]
    assert book.completed == 2
    assert book.next_step(0) == 2  # worker 0 jumps to the frontier
    book.assign(0, 2)
    book.arrive(0, 2)
    assert _drain(book) == [2]


def test_assign_refuses_applied_and_past_the_end_steps() -> None:
    book = _book(1, total=2)
    book.assign(0, 0)
    book.arrive(0, 0)
    assert _drain(book) == [0]
    with pytest.raises(ValueError, match="already applied"):
        book.assign(0, 0)
    with pytest.raises(ValueError, match="past the last step"):
        book.assign(0, 2)
    book.assign(0, 1)
    book.arrive(0, 1)
    assert _drain(book) == [1]
    assert book.finished()


def test_arrive_rejects_unexpected_gradients() -> None:
    book = _book(2)
    book.assign(0, 0)
    assert not book.arrive(1, 0)  # not assigned
    assert not book.arrive(0, 5)  # unknown step
    assert book.arrive(0, 0)
    assert not book.arrive(0, 0)  # twice


def test_leave_removes_unsent_assignments_only() -> None:
    book = _book(3, jumps=True)
    for w in range(3):
        book.assign(w, 0)
    book.arrive(0, 0)
    book.arrive(2, 0)
    book.assign(2, 1)  # worker 2 ran ahead
    book.arrive(2, 1)
    book.assign(2, 2)
    # worker 2 leaves: its step-0 and step-1 gradients arrived and stay; step 2 is unsent
    assert book.leave(2) == [2]
    assert book.open[0].assigned == {0, 1, 2}
    assert book.open[1].assigned == {2}
    assert 2 not in book.open[2].assigned
    assert 2 not in book.live
    # worker 1 leaves without sending step 0: step 0 completes with 0 and 2
    assert book.leave(1) == [0]
    entry = book.completable()
    assert entry is not None and entry.step == 0 and entry.arrived == {0, 2}
    book.complete(0)


def test_leave_of_the_last_missing_worker_unblocks_the_step() -> None:
    book = _book(2)
    book.assign(0, 0)
    book.assign(1, 0)
    book.arrive(0, 0)
    assert book.completable() is None
    book.leave(1)
    entry = book.completable()
    assert entry is not None and entry.arrived == {0} and entry.assigned == {0}


def test_lost_gradients_resolve_a_step() -> None:
    book = _book(2)
    book.assign(0, 0)
    book.assign(1, 0)
    book.arrive(0, 0)
    book.lose(1, 0)
    entry = book.completable()
    assert entry is not None and entry.lost == {1} and entry.arrived == {0}
    book.lose(0, 0)  # already arrived: not lost
    assert entry.lost == {1}


def test_no_jumps_a_straggler_replays_every_step() -> None:
    book = _book(2, jumps=False)
    book.assign(0, 0)
    book.assign(1, 0)
    book.arrive(0, 0)
    # without jumps nobody passes step 0 until it is applied; next_step is last + 1
    assert book.next_step(0) == 1
    book.arrive(1, 0)
    _drain(book)
    assert book.next_step(1) == 1


def test_jumps_a_straggler_skips_to_the_frontier() -> None:
    book = _book(2, jumps=True)
    book.assign(0, 0)
    book.assign(1, 0)
    book.arrive(1, 0)
    for s in (1, 2, 3):
        book.assign(1, s)
        book.arrive(1, s)
    assert book.frontier == 3
    book.arrive(0, 0)
    assert _drain(book) == [0, 1, 2]  # 1 and 2 complete without worker 0
    assert book.next_step(0) == 3  # not 1
    book.assign(0, 3)
    book.arrive(0, 3)
    assert _drain(book) == [3]


def test_start_step_resumes_the_numbering() -> None:
    book = StepBook(10, jumps=False, start_step=5)
    book.join(0)
    assert book.next_step(0) == 5
    with pytest.raises(ValueError, match="already applied"):
        book.assign(0, 4)


# -- rules ------------------------------------------------------------------------------------


def test_sync_rule_waits_for_every_earlier_step() -> None:
    rule = SyncRule()
    assert not rule.jumps
    assert rule.may_start(3, None, None, None, True).allowed
    assert rule.may_start(3, 3, None, None, True).allowed
    d = rule.may_start(3, 2, 1.0, 5.0, False)
    assert not d.allowed and "step 2" in d.reason


def test_straggler_rule_beta_is_the_share_of_the_other_workers_arrived() -> None:
    rule = StragglerRule(beta=0.5, max_lag=4)
    assert rule.jumps
    assert not rule.may_start(1, 0, 2.0, 0.49, False).allowed
    d = rule.may_start(1, 0, 2.0, 0.5, False)
    assert d.allowed and "beta=0.5" in d.reason
    assert rule.may_start(1, 0, 2.0, 1.0, False).allowed
    assert not rule.may_start(1, 0, 2.0, None, False).allowed  # nothing received yet
    # beta 0: start at once
    assert StragglerRule(beta=0.0, max_lag=4).may_start(1, 0, 2.0, None, False).allowed


def test_straggler_rule_beta_one_waits_for_the_whole_step() -> None:
    rule = StragglerRule(beta=1.0, max_lag=4)
    # every other gradient arrived, but the step is not applied yet: sync still waits
    d = rule.may_start(1, 0, 2.0, 1.0, False)
    assert not d.allowed and "beta=1" in d.reason
    assert rule.may_start(1, None, 2.0, 1.0, True).allowed


def test_straggler_rule_previous_step_complete_shortcut() -> None:
    rule = StragglerRule(beta=0.9, max_lag=2)
    d = rule.may_start(1, None, 2.0, 0.0, True)
    assert d.allowed and "complete" in d.reason
    # no own gradient recorded (a fresh worker) counts as complete
    assert rule.may_start(1, 1, None, None, False).allowed


def test_straggler_rule_max_lag_bound() -> None:
    rule = StragglerRule(beta=0.0, max_lag=2)
    assert rule.may_start(5, 3, 1.0, 1.0, False).allowed  # 2 ahead
    d = rule.may_start(6, 3, 1.0, 1.0, False)
    assert not d.allowed and "max_lag=2" in d.reason
    # the lag bound holds even when the worker's own previous step is complete
    assert not rule.may_start(6, 3, None, None, True).allowed
    assert rule.may_start(60, None, 1.0, 0.0, False).allowed  # nothing outstanding


def test_block_share_rule_thresholds_and_lag() -> None:
    half = BlockShareRule(beta=0.5, max_lag=2)
    assert half.may_start(1, 0, None).allowed  # owes nothing
    assert not half.may_start(1, 0, 0.49).allowed
    assert half.may_start(1, 0, 0.5).allowed
    assert BlockShareRule(beta=0.0, max_lag=2).may_start(1, 0, 0.0).allowed
    one = BlockShareRule(beta=1.0, max_lag=2)
    assert not one.may_start(1, 0, 0.999999).allowed
    # a share of 1 is not "every block": a block where its own gradient is 0 may be late
    assert not one.may_start(1, 0, 1.0).allowed
    assert one.may_start(1, 0, None).allowed
    d = half.may_start(3, 0, 1.0)
    assert not d.allowed and "max_lag=2" in d.reason


def test_make_step_rule_and_make_async_rule() -> None:
    assert isinstance(make_step_rule(SyncMode()), SyncRule)
    r = make_step_rule(StragglerMode(beta=0.7, max_lag=3))
    assert isinstance(r, StragglerRule) and (r.beta, r.max_lag) == (0.7, 3)
    a = make_async_rule(AsyncMode(max_staleness=5, on_stale="wait"))
    assert (a.max_staleness, a.on_stale) == (5, "wait")


def test_async_rule_refuses_beyond_tau() -> None:
    rule = AsyncRule(max_staleness=3, on_stale="refuse")
    assert rule.verdict(10, 7) == "apply"  # 3 updates old: allowed
    assert rule.verdict(10, 6) == "refuse"  # 4
    assert rule.verdict(10, 10) == "apply"
    # refuse mode never holds anything back
    assert rule.may_apply(100, 0, [0, 1]).allowed
    assert AsyncRule(max_staleness=0, on_stale="refuse").verdict(1, 0) == "refuse"


def test_async_rule_wait_mode_holds_updates_that_would_make_a_gradient_stale() -> None:
    rule = AsyncRule(max_staleness=2, on_stale="wait")
    assert rule.verdict(10, 8) == "apply"  # within tau
    # past tau: wait mode never lets a gradient get there unless tau was tightened while
    # it was out; then it is refused (holding it would wait for ever)
    assert rule.verdict(10, 0) == "refuse"
    assert rule.may_apply(5, 5, []).allowed  # nobody outstanding
    # outstanding gradient on view 4: after this update it would be 6 - 4 = 2 late: fine
    assert rule.may_apply(5, 5, [4, 5]).allowed
    # on view 3 it would be 3 late: hold
    d = rule.may_apply(5, 5, [5, 3])
    assert not d.allowed and "view 3" in d.reason and "max_staleness=2" in d.reason


# -- property: a StepBook under random arrival orders ---------------------------------------


@dataclass
class Run:
    """What a simulated job did."""

    applied: list[tuple[int, frozenset[int]]] = field(default_factory=list)
    assigned: dict[int, set[int]] = field(default_factory=lambda: defaultdict(set))
    max_ahead: int = 0


def _others_share(book: StepBook, w: int, last: int | None) -> float | None:
    """The straggler rule's input: the share of the others of ``last`` that arrived."""
    if last is None:
        return None
    entry = book.open.get(last)
    others = (entry.assigned - {w}) if entry is not None else set()
    if entry is None or not others:
        return 1.0
    return len(entry.arrived & others) / len(others)


def _start_ready(
    rule: StepRule,
    book: StepBook,
    run: Run,
    total: int,
    live: set[int],
    inflight: dict[int, int],
    last: dict[int, int | None],
    own: dict[int, float],
) -> None:
    """Start every idle worker the rule lets start (as the coordinator's schedule does)."""
    for w in sorted(live):
        if w in inflight:
            continue
        target = book.next_step(w)
        if target >= total:
            continue
        lw = last[w]
        last_complete = lw is None or lw < book.completed
        received = _others_share(book, w, lw)
        d = rule.may_start(
            target,
            book.oldest_incomplete,
            None if last_complete else own.get(w),
            received,
            last_complete,
        )
        if not d.allowed:
            continue
        if book.oldest_incomplete is not None:
            run.max_ahead = max(run.max_ahead, target - book.oldest_incomplete)
        book.assign(w, target)
        run.assigned[target].add(w)
        inflight[w] = target


def _drive(
    rule: StepRule,
    p: int,
    total: int,
    data: st.DataObject,
    norms: bool = False,
    churn: bool = False,
) -> Run:
    """Run a StepBook the way the coordinator does, with hypothesis choosing the order in
    which in-flight gradients arrive (and, with ``churn``, when workers leave and join)."""
    book = StepBook(total, jumps=rule.jumps)
    run = Run()
    live = set(range(p))
    for w in live:
        book.join(w)
    next_id = p
    churn_left = 8 if churn else 0  # leave/join events, so the run still ends
    inflight: dict[int, int] = {}
    last: dict[int, int | None] = dict.fromkeys(live)
    own: dict[int, float] = {}
    for _ in range(20 * total * (p + 2)):
        if book.finished():
            break
        _start_ready(rule, book, run, total, live, inflight, last, own)
        assert inflight, f"deadlock: no gradient in flight at completed={book.completed}"
        event = data.draw(st.integers(0, 19), label="event") if churn_left else 2
        if event == 0 and len(live) > 1:
            churn_left -= 1
            w = data.draw(st.sampled_from(sorted(live)), label="leaves")
            live.discard(w)
            inflight.pop(w, None)
            for s in book.leave(w):
                run.assigned[s].discard(w)
        elif event == 1:
            churn_left -= 1
            book.join(next_id)
            live.add(next_id)
            last[next_id] = None
            next_id += 1
        else:
            w = data.draw(st.sampled_from(sorted(inflight)), label="arrives")
            step = inflight.pop(w)
            assert book.arrive(w, step)
            norm = data.draw(st.floats(0.1, 10.0), label="norm") if norms else 1.0
            own[w] = norm
            last[w] = step
        while (entry := book.completable()) is not None:
            run.applied.append((entry.step, frozenset(entry.arrived)))
            book.complete(entry.step)
    assert book.finished(), "the job did not finish"
    return run


@settings(max_examples=150, deadline=None)
@given(p=st.integers(1, 6), total=st.integers(1, 12), data=st.data())
def test_sync_stepbook_applies_every_step_once_in_order_with_all_assigned(
    p: int, total: int, data: st.DataObject
) -> None:
    run = _drive(SyncRule(), p, total, data)
    assert [s for s, _ in run.applied] == list(range(total))
    for step, arrived in run.applied:
        assert arrived == run.assigned[step] == set(range(p))
    assert run.max_ahead == 0  # sync: nobody starts past an incomplete step


@settings(max_examples=100, deadline=None)
@given(p=st.integers(1, 5), total=st.integers(1, 12), data=st.data())
def test_sync_stepbook_with_workers_leaving_and_joining(
    p: int, total: int, data: st.DataObject
) -> None:
    run = _drive(SyncRule(), p, total, data, churn=True)
    assert [s for s, _ in run.applied] == list(range(total))
    for step, arrived in run.applied:
        # exactly the workers that were assigned and did not leave before sending
        assert arrived == run.assigned[step]


@settings(max_examples=150, deadline=None)
@given(
    p=st.integers(1, 5),
    total=st.integers(1, 12),
    beta=st.sampled_from([0.0, 0.5, 0.75, 1.0]),
    max_lag=st.integers(1, 3),
    churn=st.booleans(),
    data=st.data(),
)
def test_straggler_stepbook_applies_every_step_once_in_order(
    p: int, total: int, beta: float, max_lag: int, churn: bool, data: st.DataObject
) -> None:
    run = _drive(StragglerRule(beta=beta, max_lag=max_lag), p, total, data, norms=True, churn=churn)
    assert [s for s, _ in run.applied] == list(range(total))
    for step, arrived in run.applied:
        assert arrived == run.assigned[step]
        assert arrived, f"step {step} applied with no gradient"
    assert run.max_ahead <= max_lag


# -- property: async wait mode never lets a gradient go stale, and makes progress ------------


def _drive_async_wait(p: int, tau: int, updates: int, data: st.DataObject) -> list[int]:
    """The coordinator's async loop (``_schedule_async`` / ``_apply_held``): an idle worker
    gets the current view when ``may_dispatch`` allows, replies are held and applied oldest
    view first when ``may_apply`` allows; hypothesis picks which reply arrives next.

    Returns:
        The staleness of every applied gradient.
    """
    rule = AsyncRule(max_staleness=tau, on_stale="wait")
    version = 0
    busy: dict[int, int] = {}  # worker -> view version it computes on
    held: dict[int, int] = {}
    idle = set(range(p))
    stale: list[int] = []
    in_flight_max = 0
    for _ in range(50 * updates * p):
        if version >= updates:
            break
        for w in sorted(idle):
            out = [*busy.values(), *held.values()]
            if version + len(out) >= updates or not rule.may_dispatch(version, out).allowed:
                break
            busy[w] = version
            idle.discard(w)
        in_flight_max = max(in_flight_max, len(busy) + len(held))
        assert busy, f"deadlock: {len(held)} replies held at version {version}, none in flight"
        w = data.draw(st.sampled_from(sorted(busy)), label="arrives")
        held[w] = busy.pop(w)
        progress = True
        while progress:
            progress = False
            for h in sorted(held, key=lambda h: held[h]):
                others = [v for o, v in {**busy, **held}.items() if o != h]
                if rule.may_apply(version, held[h], others).allowed:
                    stale.append(version - held.pop(h))
                    version += 1
                    idle.add(h)
                    progress = True
                    break
    assert version >= updates
    # tau + 1 gradients in flight at most (the k-th oldest lands k updates late)
    assert in_flight_max <= min(p, tau + 1)
    return stale


def test_async_wait_rule_keeps_every_outstanding_gradient_within_tau() -> None:
    """``may_apply`` must look at every outstanding view, not only the oldest: tau=2,
    version 1, two other gradients on view 0. After this update (version 2) the view-0
    gradients land at staleness 2 and 3, so this update must wait. (Found by these tests;
    it hung configs/least_squares.yaml.)"""
    rule = AsyncRule(max_staleness=2, on_stale="wait")
    assert not rule.may_apply(1, 1, [0, 0]).allowed
    # one outstanding on view 0 is fine: it lands at staleness 2
    assert rule.may_apply(1, 1, [0]).allowed


def test_async_wait_rule_limits_dispatch_to_what_tau_allows() -> None:
    rule = AsyncRule(max_staleness=1, on_stale="wait")
    assert rule.may_dispatch(5, []).allowed
    assert rule.may_dispatch(5, [5]).allowed  # two on view 5: the second lands 1 late
    assert not rule.may_dispatch(5, [5, 5]).allowed  # a third would land 2 late
    assert not AsyncRule(max_staleness=0, on_stale="wait").may_dispatch(0, [0]).allowed
    assert AsyncRule(max_staleness=0, on_stale="refuse").may_dispatch(0, [0, 0, 0]).allowed


@settings(max_examples=80, deadline=None)
@given(p=st.integers(1, 5), tau=st.integers(0, 8), data=st.data())
def test_async_wait_mode_keeps_staleness_within_tau_and_makes_progress(
    p: int, tau: int, data: st.DataObject
) -> None:
    """No applied gradient is ever more than tau updates old, and the run always finishes
    (before the fix, p=3 tau=2 held every reply with none in flight, and tau < p-1 always
    deadlocked)."""
    stale = _drive_async_wait(p, tau, updates=30, data=data)
    assert max(stale) <= tau
    assert len(stale) == 30
