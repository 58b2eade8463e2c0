"""Integration: convex least squares with a known optimum.

* The distance from the model to the exact optimum (``Dataset.optimum``, laid out like the
  parameters of ``nn.Linear``) shrinks by orders of magnitude, and the runtime reports it.
* Across async staleness bounds tau in {0, 2, 16} (``on_stale: refuse``, so a larger tau
  only *admits* more stale gradients and the comparison is clean) B-hat max grows with tau.
  One worker is slowed by exponentially distributed delays so that stale gradients of every
  age up to well past 16 occur in each run.
* The shipped config (``on_stale: wait``) runs to the end.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from integration_helpers import config, final_params, initial_params, records, run_many

from actors.datasets import load_dataset
from core.spec import JobSpec

pytestmark = pytest.mark.integration

# tau 2, not the config's 4: with 4 workers a fast worker's gradient is often 3 updates
# old, so tau 2 refuses part of the fast workers' gradients as well as most of the
# straggler's, a difference that does not depend on timing. Between tau 4 and 16 only the
# straggler's share differs, and on a loaded machine the spread of the rest was larger
# (a CI run: mean 1.08 at tau 4 against 0.90 at tau 16). Under two busy loops on the 2
# cores: 0.74 at tau 2 against 1.26 at tau 16.
TAUS = [0, 2, 16]
SWEEP_STEPS = 100  # x 4 workers = 400 applied updates per run
# worker 0 stalls ~20 ms per gradient (exponential), while the other three apply updates
STRAGGLER = {
    "kind": "delay",
    "workers": [0],
    "delay_ms": 20.0,
    "distribution": "exponential",
}


def _sweep_spec(tau: int) -> JobSpec:
    return config(
        "least_squares.yaml",
        name=f"ls-tau{tau}",
        steps=SWEEP_STEPS,
        eval_interval=10,
        mode={"name": "async", "max_staleness": tau, "on_stale": "refuse"},
        faults=[STRAGGLER],
    )


@pytest.fixture(scope="module")
def sweep(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[int, tuple[JobSpec, Path, dict[str, Any]]]:
    """The three runs at once (3 x 1.25 CPUs), so they share the machine's conditions."""
    jobs = [(_sweep_spec(t), tmp_path_factory.mktemp(f"tau{t}")) for t in TAUS]
    summaries = run_many(jobs)
    out = {}
    for tau, (spec, path), s in zip(TAUS, jobs, summaries, strict=True):
        assert s["state"] == "succeeded", (tau, s.get("error"))
        out[tau] = (spec, path, s)
    return out


@pytest.mark.timeout(900)
@pytest.mark.parametrize("tau", TAUS)
def test_distance_to_the_optimum_shrinks(
    sweep: dict[int, tuple[JobSpec, Path, dict[str, Any]]], tau: int
) -> None:
    spec, out, summary = sweep[tau]
    ds = load_dataset(spec.dataset, spec.seed)
    assert ds.optimum is not None
    opt = torch.from_numpy(ds.optimum)
    start = float((initial_params(spec, ds) - opt).norm())
    end = float((final_params(out) - opt).norm())
    assert start > 1.0  # the target is not where the model starts
    # constant-step SGD on a strongly convex problem: linear convergence to a noise ball;
    # 400 updates at lr 0.05 on standardised features take the distance down by > 100x
    assert end < start / 100, (start, end)
    # the runtime reports the same distance (summary and eval records)
    assert summary.get("final_dist_to_optimum") == pytest.approx(end, rel=1e-4, abs=1e-6)
    dists = [r["dist_to_optimum"] for r in records(out) if r["kind"] == "eval"]
    assert dists[0] == pytest.approx(start, rel=1e-4)
    assert dists[-1] == pytest.approx(end, rel=1e-4, abs=1e-6)
    # it shrinks as the theory says: each eval window at least halves the distance until
    # the noise floor (a few times the final distance) is reached
    floor = 5 * end
    for before, after in itertools.pairwise(dists):
        assert after <= max(before / 2, floor), dists


@pytest.mark.timeout(900)
def test_larger_tau_gives_larger_b_hat(
    sweep: dict[int, tuple[JobSpec, Path, dict[str, Any]]],
) -> None:
    # the mean (the paper's expectation, the verdict's quantity): the max of a few hundred
    # samples saturates (29.07 at tau 4 against 28.92 at tau 16 in one run)
    b = {tau: sweep[tau][2]["consistency"]["b_hat_mean"] for tau in TAUS}
    refused = {tau: sweep[tau][2]["refused_stale"] for tau in TAUS}
    # tau = 0 with refuse: only gradients on the current model are applied
    print(f"mean B-hat by tau {b}, refused {refused}")
    assert b[0] == 0.0
    assert b[0] < b[2] < b[16], (b, refused)
    # the straggler's gradients are refused more often under a tighter bound
    assert refused[0] > refused[2] >= refused[16], refused
    for tau in TAUS:
        cons = sweep[tau][2]["consistency"]
        assert cons["b_hat_max"] <= (cons["bound"] or 0.0) + 1e-9, (tau, cons)


@pytest.mark.timeout(300)
def test_shipped_config_with_wait_mode_finishes(tmp_path: Path) -> None:
    """configs/least_squares.yaml (4 workers, async, tau=4, on_stale=wait) used to hang
    when ``AsyncRule.may_apply`` checked only the oldest outstanding view: two gradients
    left on one old view each waited for the other. A little jitter in the workers' timing
    (1 ms mean exponential delay) made it happen within 150 steps."""
    spec = config(
        "least_squares.yaml",
        steps=150,
        faults=[{"kind": "delay", "count": 4, "delay_ms": 1.0, "distribution": "exponential"}],
    )
    (summary,) = run_many([(spec, tmp_path)], deadline_s=120.0)
    assert summary["state"] == "succeeded"
    cons = summary["consistency"]
    assert cons["b_hat_max"] <= cons["bound"]
