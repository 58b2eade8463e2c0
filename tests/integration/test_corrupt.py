"""The ``corrupt`` fault on local Ray: corrupted gradients are refused, never applied.

Two jobs run at once (:func:`~integration_helpers.run_many`):

* the drill ``configs/drills/corrupt_gradient.yaml`` (elastic rule): worker 2 sends NaN
  gradients for 50 steps; every one is refused and recorded, the steps go on without it,
  the job reaches its accuracy, and the final model is finite;
* the same defence in async mode (``configs/digits_async.yaml``): worker 1's gradients
  become infinite with probability 0.2, and worker 0's are scaled by 0.5 for 20 steps;
  the infinite ones are refused, the scaled ones (finite) are applied.

The accounting fields are the summary's ``gradients_corrupted`` (replies the injector
marked) and ``gradients_refused_nonfinite`` (what the coordinator's check refused).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from integration_helpers import config, final_params, model_metrics, run_many

from core.events import Event, EventKind, FaultKind
from core.spec import JobSpec, parse_spec

pytestmark = pytest.mark.integration

DRILL = Path(__file__).resolve().parents[2] / "configs" / "drills" / "corrupt_gradient.yaml"
# start-up of two jobs' actors on a shared 2-core machine, plus a few seconds of training
TIMEOUT_S = 400

Run = tuple[JobSpec, dict[str, Any], Path]


def drill() -> tuple[JobSpec, dict[str, Any]]:
    """The drill's job and its criteria, read straight from the YAML file."""
    data = yaml.safe_load(DRILL.read_text())
    return parse_spec(data["job"]), data["criteria"]


def async_job() -> JobSpec:
    return config(
        "digits_async.yaml",
        name="corrupt-async",
        faults=[
            {"kind": "corrupt", "workers": [1], "corruption": "inf", "probability": 0.2},
            {
                "kind": "corrupt",
                "workers": [0],
                "corruption": "scale",
                "scale_factor": 0.5,
                "at_step": 50,
                "duration_steps": 20,
            },
        ],
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    specs = {"drill": drill()[0], "async": async_job()}
    outs = {k: tmp_path_factory.mktemp(f"corrupt-{k}") for k in specs}
    summaries = run_many([(specs[k], outs[k]) for k in specs])
    yield {k: (specs[k], s, outs[k]) for k, s in zip(specs, summaries, strict=True)}


def events(summary: dict[str, Any], kind: EventKind) -> list[Event]:
    return [e for e in map(Event.from_dict, summary["events"]) if e.kind is kind]


def assert_finished(spec: JobSpec, summary: dict[str, Any], out: Path) -> None:
    assert summary["state"] == "succeeded", summary["error"]
    assert summary["steps"] == summary["total_steps"]
    assert summary["final_test_accuracy"] >= 0.95
    x = final_params(out)
    assert bool(torch.isfinite(x).all()), "a non-finite value reached the model of record"
    # model.pt is the model the summary reports on
    metrics = model_metrics(out, spec)
    assert metrics["test_accuracy"] == pytest.approx(summary["final_test_accuracy"], abs=1e-9)


@pytest.mark.timeout(TIMEOUT_S)
def test_drill_refuses_every_corrupted_gradient(runs: dict[str, Run]) -> None:
    spec, s, out = runs["drill"]
    _, criteria = drill()
    assert criteria["finished"] and criteria["faults_recorded"]
    assert_finished(spec, s, out)
    assert s["final_test_accuracy"] >= criteria["min_test_accuracy"]
    cons = s["consistency"]
    assert cons["bound"] is not None and cons["b_hat_max"] <= cons["bound"]
    # 50 steps of the window, one gradient each (the elastic rule may skip a few)
    assert 40 <= s["gradients_corrupted"] <= 50
    assert s["gradients_refused_nonfinite"] == s["gradients_corrupted"]
    refused = events(s, EventKind.REFUSED)
    assert len(refused) == s["gradients_refused_nonfinite"]
    assert {(e.fault, e.target) for e in refused} == {(FaultKind.CORRUPT, "worker-2")}
    # an event's step is the steps completed, which trail the gradient's step by at most
    # the elastic rule's max_lag (2)
    assert all(100 - 2 <= e.step < 150 for e in refused)
    # the window's opening is the fault's event; nothing else was injected
    (on,) = events(s, EventKind.FAULT)
    assert on.fault is FaultKind.CORRUPT and on.target == "worker-2"
    assert not events(s, EventKind.DETECT), "a corrupting worker is not lost"
    assert s["dropped_gradients"] == 0


@pytest.mark.timeout(TIMEOUT_S)
def test_async_refuses_infinite_and_applies_scaled(runs: dict[str, Run]) -> None:
    spec, s, out = runs["async"]
    assert_finished(spec, s, out)
    refused = events(s, EventKind.REFUSED)
    n_refused = s["gradients_refused_nonfinite"]
    # ~0.2 x 300 gradients of worker 1: far from 0
    assert n_refused > 20
    assert len(refused) == n_refused
    assert {(e.fault, e.target) for e in refused} == {(FaultKind.CORRUPT, "worker-1")}
    # the scaled gradients were marked too, but they are finite: applied, not refused
    assert s["gradients_corrupted"] > n_refused
    on = {e.target for e in events(s, EventKind.FAULT) if e.fault is FaultKind.CORRUPT}
    assert on == {"worker-0", "worker-1"}
    # every update the job counts was applied: refused gradients are not among them
    assert s["updates"] == s["total_steps"] * spec.workers
