"""Unit tests of loading a job's task (actors/tasks/loader.py) and of the task section of
the spec: entrypoints resolve or are refused naming ``task.entrypoint``, params are
validated into the task's pydantic model (errors under ``task.params.<field>``), the
operator's module prefixes are checked before anything is imported, and a spec without
``task`` gets the built-in task."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from actors.tasks.builtin import BuiltinTask
from actors.tasks.loader import allowed, build_task, check_allowed, job_task
from core.errors import SpecError
from core.spec import MAX_PARAMS_DEPTH, TaskSpec, parse_spec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

TASK_SRC = """
from pydantic import BaseModel, Field
import torch
from torch import nn
from torch.utils.data import TensorDataset
from actors.tasks import Task

class Params(BaseModel):
    width: int = Field(default=4, ge=1, le=64)

class Tiny(Task):
    def __init__(self, params: Params) -> None:
        self.width = params.width
    def build_model(self): return nn.Linear(3, self.width)
    def train_data(self, ctx): return TensorDataset(torch.zeros(8, 3), torch.zeros(8))
    def eval_data(self, ctx): return TensorDataset(torch.zeros(4, 3), torch.zeros(4))
    def loss(self, model, batch): return model(batch[0]).square().mean()

def build(params: dict) -> Tiny:
    return Tiny(Params(**params))

def not_a_task(params):
    return 42

def two_args(a, b):
    return None

NOT_CALLABLE = 3

class Nested:
    make = staticmethod(build)
"""


@pytest.fixture
def pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A package ``usertasks_<n>`` in a temporary folder on the import path."""
    name = f"usertasks_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / name / "mod.py").write_text(textwrap.dedent(TASK_SRC))
    (tmp_path / name / "broken.py").write_text("raise RuntimeError('broken at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for m in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[m]


def _problems(exc: pytest.ExceptionInfo[SpecError]) -> dict[str, str]:
    return dict(exc.value.problems)


def test_a_task_class_gets_its_params_validated_into_its_model(pkg: str) -> None:
    task = build_task(TaskSpec(entrypoint=f"{pkg}.mod:Tiny", params={"width": 7}))
    assert task.build_model().out_features == 7  # type: ignore[operator]


def test_a_function_entrypoint_gets_the_plain_dict(pkg: str) -> None:
    task = build_task(TaskSpec(entrypoint=f"{pkg}.mod:build", params={"width": 2}))
    assert task.build_model().out_features == 2  # type: ignore[operator]
    nested = build_task(TaskSpec(entrypoint=f"{pkg}.mod:Nested.make", params={}))
    assert nested.build_model().out_features == 4  # type: ignore[operator]


def test_a_bad_param_is_named_under_task_params(pkg: str) -> None:
    with pytest.raises(SpecError) as ei:
        build_task(TaskSpec(entrypoint=f"{pkg}.mod:Tiny", params={"width": 0}))
    problems = _problems(ei)
    assert list(problems) == ["task.params.width"]
    assert ">= 1" in problems["task.params.width"]


@pytest.mark.parametrize(
    ("attr", "words"),
    [
        ("missing_attr", "has no attribute"),
        ("NOT_CALLABLE", "not callable"),
        ("not_a_task", "returned int"),
        ("two_args", "one argument"),
    ],
)
def test_entrypoints_that_are_not_tasks_are_refused_naming_the_field(
    pkg: str, attr: str, words: str
) -> None:
    with pytest.raises(SpecError) as ei:
        build_task(TaskSpec(entrypoint=f"{pkg}.mod:{attr}"))
    assert words in _problems(ei)["task.entrypoint"]


def test_a_missing_module_or_one_that_raises_on_import_is_refused(pkg: str) -> None:
    with pytest.raises(SpecError) as ei:
        build_task(TaskSpec(entrypoint=f"{pkg}.nope:build"))
    assert "no module" in _problems(ei)["task.entrypoint"]
    with pytest.raises(SpecError) as ei:
        build_task(TaskSpec(entrypoint=f"{pkg}.broken:build"))
    assert "broken at import" in _problems(ei)["task.entrypoint"]


def test_prefixes_match_whole_module_names() -> None:
    assert allowed("actors.tasks.builtin", ["actors.tasks"])
    assert allowed("gpt_bytes", ["gpt_bytes"])
    assert not allowed("gpt_bytes_evil", ["gpt_bytes"])
    assert not allowed("os", ["actors.tasks"])
    with pytest.raises(SpecError) as ei:
        check_allowed(TaskSpec(entrypoint="os:system"), ["actors.tasks", "cnn_digits"])
    msg = _problems(ei)["task.entrypoint"]
    assert "actors.tasks, cnn_digits" in msg and "ESGD_TASK_MODULES" in msg


def test_a_spec_without_task_gets_the_builtin_task_of_model_and_dataset() -> None:
    spec = parse_spec({"steps": 1, "model": {"name": "logreg"}})
    task = job_task(spec)
    assert isinstance(task, BuiltinTask)
    assert task.params.model.name == "logreg"
    named = build_task(
        TaskSpec(entrypoint="actors.tasks.builtin:BuiltinTask", params={"model": {"name": "mlp"}})
    )
    assert isinstance(named, BuiltinTask) and named.params.model.name == "mlp"


# -- the spec's task section ------------------------------------------------------------------


def _spec_problems(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(SpecError) as ei:
        parse_spec({"steps": 1, **data})
    return dict(ei.value.problems)


def test_task_and_model_or_dataset_together_are_refused() -> None:
    msg = _spec_problems({"task": {"entrypoint": "a.b:c"}, "dataset": {"name": "least_squares"}})
    assert "task or dataset, not both" in msg["spec"]
    ok = parse_spec({"steps": 1, "task": {"entrypoint": "a.b:c", "params": {"x": [1, "y"]}}})
    assert ok.task is not None and ok.task.module == "a.b"


@pytest.mark.parametrize("entrypoint", ["a.b", "a b:c", "a.b:c()", "../x:y", ":c", "a.:c"])
def test_malformed_entrypoints_are_refused(entrypoint: str) -> None:
    assert "task.entrypoint" in _spec_problems({"task": {"entrypoint": entrypoint}})


def _nested(depth: int) -> Any:
    v: Any = 1
    for _ in range(depth):
        v = {"k": v}
    return v


@pytest.mark.parametrize(
    ("params", "words"),
    [
        (_nested(MAX_PARAMS_DEPTH + 1), "nests deeper"),
        ({"s": "x" * 5000}, "at most 4096 characters"),
        ({"k" * 200: 1}, "keys must be strings"),
        ({"a": list(range(10_001))}, "more than 10000 values"),
        ({"f": float("inf")}, "finite"),
    ],
)
def test_params_are_bounded_json(params: dict[str, Any], words: str) -> None:
    msg = _spec_problems({"task": {"entrypoint": "a.b:c", "params": params}})
    assert words in msg["task.params"], msg
    parse_spec({"steps": 1, "task": {"entrypoint": "a.b:c", "params": _nested(MAX_PARAMS_DEPTH)}})


def test_precision_and_loader_workers_are_checked() -> None:
    assert "precision" in _spec_problems({"precision": "float16"})
    assert "loader_workers" in _spec_problems({"loader_workers": 9})
    spec = parse_spec({"steps": 1, "precision": "bfloat16", "loader_workers": 2})
    assert (spec.precision, spec.loader_workers) == ("bfloat16", 2)
