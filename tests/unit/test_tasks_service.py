"""Unit tests of the service's side of tasks (service/tasks.py, settings, budget): the
allowed prefixes and the runtime_env come from the settings, an entrypoint whose
constructor raises is a refused field (not a 500), the budget counts a task's parameters on
the meta device and leaves a task whose build_model raises to fail at its start."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.errors import SpecError
from core.spec import TaskSpec, parse_spec
from service.budget import count_parameters, estimate
from service.settings import DEFAULT_TASK_MODULES, SettingsError, load_settings
from service.tasks import runtime_env, validate_task

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

SRC = """
import torch
from torch import nn
from torch.utils.data import TensorDataset
from actors.tasks import Task

class Ok(Task):
    def __init__(self, params): pass
    def build_model(self): return nn.Linear(10, 3)  # 33 parameters
    def train_data(self, ctx): return TensorDataset(torch.zeros(4, 10))
    def eval_data(self, ctx): return TensorDataset(torch.zeros(4, 10))
    def loss(self, model, batch): return model(batch[0]).sum()

class BadModel(Ok):
    def build_model(self): raise RuntimeError("no model today")

class BadInit(Ok):
    def __init__(self, params): raise KeyError("needs a vocabulary")
"""


@pytest.fixture
def pkg_dir(tmp_path: Path) -> Iterator[Path]:
    name = f"svc_tasks_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(textwrap.dedent(SRC))
    before = list(sys.path)
    yield tmp_path / name
    sys.path[:] = before
    for m in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[m]


def test_settings_give_the_prefixes_and_the_runtime_env(pkg_dir: Path, tmp_path: Path) -> None:
    s = load_settings()
    assert s.task_modules == DEFAULT_TASK_MODULES and runtime_env(s) is None
    s = load_settings(
        task_modules=f"actors.tasks, {pkg_dir.name}",
        runtime_env_py_modules=str(pkg_dir),
        runtime_env_working_dir=str(tmp_path),
    )
    assert s.task_modules == ("actors.tasks", pkg_dir.name)
    assert runtime_env(s) == {"py_modules": [str(pkg_dir)], "working_dir": str(tmp_path)}
    assert s.import_paths == [pkg_dir.parent, tmp_path]
    with pytest.raises(SettingsError, match="runtime_env_py_modules"):
        load_settings(runtime_env_py_modules=str(tmp_path / "absent"))
    with pytest.raises(SettingsError, match="ESGD_TASK_MODULES"):
        load_settings(task_modules="ok,not a module")


def test_validation_imports_from_the_shipped_folders_and_names_the_field(pkg_dir: Path) -> None:
    s = load_settings(task_modules=pkg_dir.name, runtime_env_py_modules=str(pkg_dir))
    validate_task(TaskSpec(entrypoint=f"{pkg_dir.name}:Ok"), s)  # importable via the setting
    with pytest.raises(SpecError) as ei:
        validate_task(TaskSpec(entrypoint=f"{pkg_dir.name}:BadInit"), s)
    assert "KeyError" in dict(ei.value.problems)["task.entrypoint"]
    with pytest.raises(SpecError) as ei:
        validate_task(TaskSpec(entrypoint="actors.tasks.builtin:BuiltinTask"), s)
    assert pkg_dir.name in dict(ei.value.problems)["task.entrypoint"]  # the allowed prefixes


def test_the_budget_counts_a_task_s_parameters(pkg_dir: Path) -> None:
    sys.path.insert(0, str(pkg_dir.parent))
    ok = parse_spec({"steps": 1, "task": {"entrypoint": f"{pkg_dir.name}:Ok"}})
    assert count_parameters(ok) == 33
    assert estimate(ok).parameters == 33
    bad = parse_spec({"steps": 1, "task": {"entrypoint": f"{pkg_dir.name}:BadModel"}})
    assert count_parameters(bad) == 0  # the job's start reports the task's own error
    builtin = parse_spec({"steps": 1, "model": {"name": "logreg"}})
    assert count_parameters(builtin) == 64 * 10 + 10  # digits: 64 features, 10 classes
