"""Unit tests for actors/guard.py: cases built to trigger each of the guard's actions."""

from __future__ import annotations

import math
from typing import Any

import pytest

from actors.guard import Action, Condition, GuardPolicy, Observation
from core.errors import SpecError
from core.spec import GuardSpec, parse_spec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def _obs(**kw: Any) -> Observation:
    base: dict[str, Any] = {
        "step": 30,
        "loss": 1.0,
        "nonfinite": None,
        "window_mean": 1.0,
        "window_full": True,
        "bound": 10.0,
        "can_tighten": True,
        "can_rollback": True,
    }
    return Observation(**{**base, **kw})


def _policy(**kw: Any) -> GuardPolicy:
    p = GuardPolicy(GuardSpec(**kw))
    assert p.judge(_obs(step=1, loss=2.0)).action is Action.NONE  # the reference loss
    return p


def test_inside_the_bound_does_nothing() -> None:
    p = _policy()
    d = p.judge(_obs())
    assert (d.condition, d.action) == (Condition.WITHIN, Action.NONE)
    assert p.verdict is Condition.WITHIN and p.history == []


def test_no_judgement_of_the_bound_before_it_is_stated_or_the_window_is_full() -> None:
    p = _policy(on_out_of_bound="fail")
    assert p.judge(_obs(window_mean=1e9, bound=None)).action is Action.NONE  # warm-up
    assert p.judge(_obs(window_mean=1e9, window_full=False)).action is Action.NONE


def test_out_of_bound_warns_once_per_excursion() -> None:
    p = _policy(on_out_of_bound="warn")
    d = p.judge(_obs(window_mean=11.0))
    assert (d.condition, d.action) == (Condition.OUT_OF_BOUND, Action.WARN)
    assert "mean B̂ 11 " in d.reason and "bound 10" in d.reason
    assert p.judge(_obs(window_mean=12.0)).action is Action.NONE  # still out: no new event
    assert p.verdict is Condition.OUT_OF_BOUND
    p.judge(_obs(window_mean=5.0))  # back inside
    assert p.judge(_obs(window_mean=12.0)).action is Action.WARN  # a new excursion


def test_out_of_bound_tightens_or_fails() -> None:
    p = _policy(on_out_of_bound="tighten")
    assert p.judge(_obs(window_mean=11.0)).action is Action.TIGHTEN
    assert p.verdict is Condition.WITHIN  # repaired, as far as the guard knows
    d = p.judge(_obs(window_mean=11.0, can_tighten=False))
    assert d.action is Action.FAIL and "no stricter setting" in d.reason
    assert p.verdict is Condition.OUT_OF_BOUND
    f = _policy(on_out_of_bound="fail").judge(_obs(window_mean=11.0))
    assert (f.condition, f.action) == (Condition.OUT_OF_BOUND, Action.FAIL)
    assert f.reason.startswith("out of bound: mean B̂ 11")


def test_the_action_budget_is_kept() -> None:
    p = _policy(on_out_of_bound="tighten", max_actions=2)
    assert [p.judge(_obs(window_mean=11.0)).action for _ in range(3)] == [
        Action.TIGHTEN,
        Action.TIGHTEN,
        Action.FAIL,
    ]
    assert "max_actions=2" in p.history[-1].reason


@pytest.mark.parametrize(
    ("obs", "words"),
    [
        ({"loss": math.inf}, "loss inf"),
        ({"loss": math.nan}, "loss nan"),
        ({"nonfinite": "non-finite gradient from worker-3"}, "worker-3"),
        ({"loss": 25.0}, "loss 25 > 10 x first loss 2"),
    ],
)
def test_divergence_fails_the_run_by_default(obs: dict[str, Any], words: str) -> None:
    d = _policy().judge(_obs(**obs))
    assert (d.condition, d.action) == (Condition.DIVERGED, Action.FAIL)
    assert d.reason.startswith("diverged: ") and words in d.reason


def test_divergence_is_judged_before_the_bound_and_during_the_warm_up() -> None:
    d = _policy(on_out_of_bound="warn").judge(_obs(loss=1e6, bound=None, window_mean=1e9))
    assert d.condition is Condition.DIVERGED


def test_a_loss_below_the_multiple_is_not_divergence() -> None:
    assert _policy().judge(_obs(loss=19.9)).action is Action.NONE
    assert _policy().judge(_obs(loss=None)).action is Action.NONE  # no gradient arrived


def test_divergence_rolls_back_when_it_can() -> None:
    p = _policy(on_diverged="rollback")
    assert p.judge(_obs(loss=1e6)).action is Action.ROLLBACK
    no_ckpt = p.judge(_obs(loss=1e6, can_rollback=False))
    assert no_ckpt.action is Action.FAIL and "no checkpoint" in no_ckpt.reason
    stuck = p.judge(_obs(loss=1e6, can_tighten=False))
    assert stuck.action is Action.FAIL and "no stricter setting" in stuck.reason
    assert p.verdict is Condition.DIVERGED


def test_the_guard_section_is_validated() -> None:
    spec = parse_spec({"steps": 10})
    assert spec.guard.on_out_of_bound == "warn" and spec.guard.on_diverged == "fail"
    assert spec.guard.warmup_steps == 20
    for bad, field in [
        ({"on_out_of_bound": "ignore"}, "guard.on_out_of_bound"),
        ({"on_diverged": "tighten"}, "guard.on_diverged"),
        ({"warmup_steps": 0}, "guard.warmup_steps"),
        ({"safety_factor": 0.5}, "guard.safety_factor"),
        ({"divergence_factor": 1.0}, "guard.divergence_factor"),
        ({"window": 3}, "guard.window"),
    ]:
        with pytest.raises(SpecError) as exc:
            parse_spec({"steps": 10, "guard": bad})
        assert any(path == field for path, _ in exc.value.problems), exc.value.problems


def test_a_rollback_destination_must_be_healthy() -> None:
    """Checkpoints are left only by a model whose loss is finite and no worse than the
    run's first: one on its way to a divergence is not a destination."""
    from actors.guard import GuardPolicy
    from core.spec import GuardSpec

    p = GuardPolicy(GuardSpec())
    assert p.healthy(None) and p.healthy(5.0)  # no reference yet: any finite loss
    assert not p.healthy(float("nan"))
    p.first_loss = 2.3
    assert p.healthy(0.4) and p.healthy(2.3)
    assert not p.healthy(2.31) and not p.healthy(float("inf"))
