"""Unit tests for the example tasks' configs: each names an installed entrypoint whose
params validate, the transformer's is the 5-10M parameter model, and the elastic variant
differs from the synchronous one in its mode (and name) only."""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.plain_task import TaskRef, load_job, load_task

pytestmark = pytest.mark.unit

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EXAMPLE_CONFIGS = ["gpt_bytes.yaml", "gpt_bytes_elastic.yaml", "cnn_digits.yaml"]


def _raw(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CONFIGS / name).read_text())
    return data


@pytest.mark.parametrize("name", EXAMPLE_CONFIGS)
def test_config_names_a_task_whose_params_validate(name: str) -> None:
    job = load_job(CONFIGS / name)
    task = load_task(job.task)
    model = task.build_model()
    assert sum(p.numel() for p in model.parameters()) > 0
    assert job.optimizer.name == "adamw" and job.optimizer.no_decay_bias_and_norm
    assert job.optimizer.schedule.name == "warmup_cosine"


def test_transformer_config_is_the_5_to_10m_model_with_clipping() -> None:
    job = load_job(CONFIGS / "gpt_bytes.yaml")
    model = load_task(TaskRef.model_validate(_raw("gpt_bytes.yaml")["task"])).build_model()
    assert 5_000_000 <= sum(p.numel() for p in model.parameters()) <= 10_000_000
    assert job.optimizer.clip_grad_norm == 1.0 and job.optimizer.schedule.warmup_steps > 0


def test_elastic_variant_differs_in_mode_only() -> None:
    sync, elastic = _raw("gpt_bytes.yaml"), _raw("gpt_bytes_elastic.yaml")
    assert sync["mode"] == {"name": "sync"} and elastic["mode"]["name"] == "elastic"
    strip = {"mode", "name"}
    assert {k: v for k, v in sync.items() if k not in strip} == {
        k: v for k, v in elastic.items() if k not in strip
    }


@pytest.mark.parametrize(
    ("dist", "package"), [("gpt-bytes", "gpt_bytes"), ("cnn-digits", "cnn_digits")]
)
def test_examples_are_installed_packages_that_depend_on_elastic_sgd(
    dist: str, package: str
) -> None:
    """`make setup` installs them with pip, as a user installs a task package (a folder on
    sys.path would import, but would have no distribution metadata)."""
    assert importlib.metadata.version(dist) == "0.1.0"
    requires = importlib.metadata.requires(dist) or []
    assert any(r.startswith("elastic-sgd") for r in requires), requires
    assert importlib.import_module(f"{package}.task").build is not None
