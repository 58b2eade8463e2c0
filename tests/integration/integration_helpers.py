"""Helpers for the integration tests: load a shipped config with overrides, run jobs on the
session's Ray (one, or several at once), and read what a run wrote (metrics, model.pt)."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from actors.datasets import Dataset, evaluate, load_dataset
from actors.models import build_model
from core.spec import JobSpec, load_spec, parse_spec
from service.local_run import run_local
from service.runner import JobRunner

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
# a job's small share of the session's 4 CPUs: 0.1 a worker, 0.2 for the coordinator, so
# several jobs (of up to 8 workers) run at once
SMALL = {"worker_cpus": 0.1, "coordinator_cpus": 0.2}


def guard_events(summary: dict[str, Any], action: str) -> list[dict[str, Any]]:
    """The summary's guard events of ``action`` (``warn``, ``tighten``, ``fail``, ...)."""
    return [e for e in summary["events"] if e["kind"] == "guard" and e.get("guard") == action]


def config(config_file: str, **overrides: Any) -> JobSpec:
    """A shipped config with top-level (or nested, as dicts) fields overridden."""
    base = load_spec(CONFIGS / config_file).model_dump()
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "mode":
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return parse_spec(base)


def run_job(spec: JobSpec, out: Path) -> dict[str, Any]:
    """Run ``spec`` to the end on the session's Ray; returns the summary (and checks it
    matches summary.json)."""
    summary = run_local(spec, out, progress=False)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["steps"] == summary["steps"]
    return summary


def records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def load_model(out: Path, spec: JobSpec, ds: Dataset) -> torch.nn.Module:
    """The trained model from ``out/model.pt`` (plain ``torch.load``, weights only)."""
    saved = torch.load(out / "model.pt", weights_only=True)
    model = build_model(spec.model, ds.n_features, ds.n_outputs, ds.input_shape)
    model.load_state_dict(saved["state_dict"])
    return model


def final_params(out: Path) -> torch.Tensor:
    """model.pt's parameters, flattened in ``parameters()`` order."""
    saved = torch.load(out / "model.pt", weights_only=True)
    return torch.cat([t.reshape(-1) for t in saved["state_dict"].values()])


def initial_params(spec: JobSpec, ds: Dataset) -> torch.Tensor:
    """The coordinator's starting point: ``torch.manual_seed(seed)`` then ``build_model``."""
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, ds.n_features, ds.n_outputs, ds.input_shape)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def model_metrics(out: Path, spec: JobSpec) -> dict[str, float]:
    ds = load_dataset(spec.dataset, spec.seed)
    return evaluate(load_model(out, spec, ds), ds)


# Each phase of a job's start (the coordinator, then its workers: half of it) within this.
# JobRunner's default of 120 s leaves a worker 60 s, which ten actors importing torch at once
# overran on a 2-core machine shared with other test sessions (load average 30): the job
# went on with fewer workers than its spec. What a start may take is not what these tests
# check (test_budgets.py checks the timeouts themselves); a quick start is not slowed.
START_TIMEOUT_S = 300.0


def run_many(jobs: list[tuple[JobSpec, Path]], deadline_s: float = 400.0) -> list[dict[str, Any]]:
    """Run several jobs at once (start-up, the costly part, overlaps); returns their
    summaries in order. The jobs must fit the session's 4 CPUs together, or their workers
    could wait for each other forever. Each may take :data:`START_TIMEOUT_S` to start.

    Raises:
        AssertionError: a job did not end within ``deadline_s`` (it is cancelled).
    """
    need = sum(b["CPU"] for spec, _ in jobs for b in JobRunner.resources(spec))
    assert need <= 4.0, f"jobs need {need} CPUs together; the session has 4"
    runners = [
        JobRunner(
            f"it-{uuid.uuid4().hex[:8]}", spec, out, detached=False, start_timeout_s=START_TIMEOUT_S
        )
        for spec, out in jobs
    ]
    try:
        with ThreadPoolExecutor(len(runners)) as pool:
            list(pool.map(JobRunner.start, runners))
        end = time.monotonic() + deadline_s
        pending = list(runners)
        while pending:
            for r in list(pending):
                if r.done():
                    pending.remove(r)
                else:
                    r.poll()
            if pending and time.monotonic() > end:
                states = [r.poll().status.get("step") for r in pending]
                raise AssertionError(
                    f"{len(pending)} job(s) still running after {deadline_s:.0f} s, "
                    f"at steps {states}"
                )
            time.sleep(0.2)
        return [r.finish() for r in runners]
    finally:
        for r in runners:  # whatever did not finish: stop it
            if r.actor is not None:
                with contextlib.suppress(Exception):
                    r.cancel()
                r.release()
