"""Unit tests for core/spec.py: every shipped config loads; unknown keys and out-of-range
values are refused with the field's path and the allowed range; steps/epochs exclusivity; npz
path traversal; the discriminated mode union."""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import pytest
import yaml
from pydantic import BaseModel

from core.errors import SpecError
from core.spec import JobSpec, load_spec, parse_spec

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
DRILLS = sorted((ROOT / "configs" / "drills").glob("*.yaml"))
BASE: dict[str, Any] = {"steps": 10}


def _problems(data: Any) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert info.value.problems, "a SpecError must name at least one problem"
    return info.value.problems


def _with(**fields: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data.update(fields)
    return data


def _only(data: Any) -> tuple[str, str]:
    problems = _problems(data)
    assert len(problems) == 1, problems
    return problems[0]


# -- shipped configs -----------------------------------------------------------------------


def test_the_issue_s_configs_are_there() -> None:
    names = {p.name for p in CONFIGS}
    for want in (
        "digits_sync.yaml",
        "digits_elastic.yaml",
        "digits_async.yaml",
        "digits_topk_ef.yaml",
    ):
        assert want in names
    assert any("least_squares" in n for n in names)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path: Path) -> None:
    spec = load_spec(path)
    assert isinstance(spec, JobSpec)
    # a round trip through the spec's own dump is accepted unchanged
    assert parse_spec(spec.model_dump()) == spec


@pytest.mark.parametrize(
    "path", [p for p in CONFIGS if p.name.startswith("digits_")], ids=lambda p: p.name
)
def test_digits_configs_use_four_workers(path: Path) -> None:
    spec = load_spec(path)
    assert spec.workers == 4 and spec.dataset.name == "digits"


@pytest.mark.parametrize("path", DRILLS, ids=lambda p: p.name)
def test_every_drill_s_job_loads(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        pytest.skip(f"{path.name} is not a mapping")
    if "job" in data:  # a drill: name, job, criteria
        parse_spec(data["job"])
    elif {"steps", "epochs", "model", "dataset"} & set(data):
        parse_spec(data)
    else:
        pytest.skip(f"{path.name} is not a job spec")


def test_load_spec_reports_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "nope.yaml")
    assert info.value.problems[0][0] == "file"
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(listy)


def test_defaults_fill_a_minimal_spec() -> None:
    spec = parse_spec({"steps": 5})
    assert spec.mode.name == "sync" and spec.workers == 4 and spec.optimizer.lr > 0


# -- unknown keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "path"),
    [
        (_with(model={"name": "mlp", "hiden": [3]}), "model.hiden"),
        (_with(stpes=3), "stpes"),
        (_with(optimizer={"lr": 0.1, "momentun": 0.9}), "optimizer.momentun"),
        (_with(dataset={"name": "digits", "tset_fraction": 0.2}), "dataset.tset_fraction"),
        (_with(compression={"name": "topk", "fractoin": 0.1}), "compression.fractoin"),
        (_with(faults=[{"kind": "delay", "delay_ms": 5, "workerz": [0]}]), "faults.0.workerz"),
    ],
)
def test_unknown_keys_are_refused_with_their_path(data: dict[str, Any], path: str) -> None:
    got_path, msg = _only(data)
    assert got_path == path
    assert "unknown field" in msg
    # the SpecError's text carries the path too (what the CLI prints)
    with pytest.raises(SpecError, match=path.replace(".", r"\.")):
        parse_spec(data)


def test_an_unknown_key_inside_a_mode_is_refused_with_the_mode_path() -> None:
    got_path, msg = _only(_with(mode={"name": "sync", "beta": 0.5}))
    assert got_path.startswith("mode.") and got_path.endswith("beta")
    assert "unknown field" in msg


# -- out-of-range values -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "path", "allowed"),
    [
        (_with(optimizer={"lr": -1}), "optimizer.lr", "> 0"),
        (_with(optimizer={"lr": 1000}), "optimizer.lr", "<= 100"),
        (_with(optimizer={"momentum": 1.0}), "optimizer.momentum", "< 1"),
        (_with(workers=0), "workers", ">= 1"),
        (_with(batch_size=0), "batch_size", ">= 1"),
        (_with(steps=0), "steps", ">= 1"),
        (_with(dataset={"test_fraction": 1.0}), "dataset.test_fraction", "< 1"),
        (_with(compression={"name": "topk", "fraction": 0.0}), "compression.fraction", "> 0"),
        (_with(seed=-3), "seed", ">= 0"),
    ],
)
def test_out_of_range_values_name_path_and_allowed_range(
    data: dict[str, Any], path: str, allowed: str
) -> None:
    got_path, msg = _only(data)
    assert got_path == path
    assert "allowed:" in msg and allowed in msg, msg


@pytest.mark.parametrize(
    ("mode", "field", "allowed"),
    [
        ({"name": "elastic", "beta": -0.5}, "beta", ">= 0"),
        ({"name": "elastic", "beta": 1.5}, "beta", "<= 1"),
        ({"name": "straggler", "beta": 2.0}, "beta", "<= 1"),
        ({"name": "elastic", "max_lag": 0}, "max_lag", ">= 1"),
        ({"name": "async", "max_staleness": -1}, "max_staleness", ">= 0"),
        ({"name": "async", "max_staleness": 100_000}, "max_staleness", "<= 10000"),
    ],
)
def test_out_of_range_mode_values_name_the_mode_field(
    mode: dict[str, Any], field: str, allowed: str
) -> None:
    got_path, msg = _only(_with(mode=mode))
    assert got_path.startswith("mode.") and got_path.endswith(field), got_path
    assert "allowed:" in msg and allowed in msg, msg


@pytest.mark.parametrize(
    ("mode", "path"),
    [
        ({"name": "elastic", "beta": -0.5}, "mode.beta"),
        ({"name": "async", "max_staleness": -1}, "mode.max_staleness"),
    ],
)
def test_mode_field_paths_are_the_paths_the_user_wrote(mode: dict[str, Any], path: str) -> None:
    """Pydantic puts the union tag in the location (``mode.elastic.beta``); the user wrote
    ``mode: {name: elastic, beta: -0.5}`` and must be told ``mode.beta``."""
    got_path, _ = _only(_with(mode=mode))
    assert got_path == path


def test_wrong_types_are_refused_with_the_path() -> None:
    got_path, msg = _only(_with(workers="four"))
    assert got_path == "workers" and "integer" in msg
    got_path, _ = _only(_with(mode="sync"))
    assert got_path == "mode"


def test_several_problems_are_all_reported() -> None:
    problems = _problems(_with(workers=0, optimizer={"lr": -1}, model={"hiden": [1]}))
    assert {p for p, _ in problems} == {"workers", "optimizer.lr", "model.hiden"}


def test_a_non_mapping_spec_is_refused() -> None:
    assert _only([1, 2])[0] == "spec"
    assert _only(None)[0] == "spec"


# -- cross-field rules ---------------------------------------------------------------------


def test_steps_and_epochs_are_exclusive_and_one_is_required() -> None:
    _, msg = _only({"steps": 10, "epochs": 2})
    assert "steps" in msg and "epochs" in msg and "not both" in msg
    _, msg = _only({})
    assert "steps" in msg and "epochs" in msg
    assert parse_spec({"epochs": 2}).epochs == 2
    assert parse_spec({"steps": 7}).steps == 7


def test_epochs_become_steps_by_the_global_batch() -> None:
    spec = parse_spec({"epochs": 2, "workers": 4, "batch_size": 32})
    # 2 epochs x 1437 rows / (4 x 32 per step) = 22.45 -> 23 steps
    assert spec.total_steps(1437) == 23
    assert parse_spec({"steps": 9}).total_steps(1437) == 9


def test_min_and_max_workers_must_bracket_workers() -> None:
    _, msg = _only(_with(workers=2, min_workers=3))
    assert "min_workers" in msg
    _, msg = _only(_with(workers=4, max_workers=2))
    assert "max_workers" in msg


def test_nesterov_needs_momentum() -> None:
    path, msg = _only(_with(optimizer={"nesterov": True}))
    assert path.startswith("optimizer") and "momentum" in msg
    assert parse_spec(_with(optimizer={"nesterov": True, "momentum": 0.9})).optimizer.nesterov


def test_fault_targets_must_be_live_worker_ids() -> None:
    _, msg = _only(_with(workers=2, faults=[{"kind": "crash", "workers": [5], "at_step": 3}]))
    assert "faults.0.workers" in msg


# -- npz paths -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["../x.npz", "/etc/passwd.npz", "a/../../x.npz", "~/x.npz", "sub/../../../etc/x.npz"],
)
def test_npz_path_traversal_is_refused(path: str) -> None:
    problems = _problems(_with(dataset={"name": "npz", "path": path}))
    text = " ".join(f"{p}: {m}" for p, m in problems)
    assert "dataset.path" in text
    assert "inside the data directory" in text


def test_npz_paths_inside_the_data_dir_are_accepted() -> None:
    for ok in ("x.npz", "sub/dir/x.npz"):
        spec = parse_spec(_with(dataset={"name": "npz", "path": ok}))
        assert spec.dataset.path == ok


def test_npz_needs_a_path_ending_in_npz_and_only_npz_takes_one() -> None:
    assert "required" in _only(_with(dataset={"name": "npz"}))[1]
    assert ".npz" in _only(_with(dataset={"name": "npz", "path": "x.csv"}))[1]
    assert "only allowed" in _only(_with(dataset={"name": "digits", "path": "x.npz"}))[1]


# -- the discriminated mode union ----------------------------------------------------------


def test_unknown_mode_name_names_the_mode_field_and_the_choices() -> None:
    path, msg = _only(_with(mode={"name": "eventual"}))
    assert path in ("mode", "mode.name")
    assert "eventual" in msg
    for name in ("sync", "elastic", "async"):
        assert name in msg


def test_missing_mode_name_names_the_mode_field() -> None:
    path, msg = _only(_with(mode={"beta": 0.5}))
    assert path in ("mode", "mode.name")
    assert "name" in msg


def test_each_mode_parses_to_its_own_type() -> None:
    from core.spec import AsyncMode, ElasticMode, SyncMode

    assert isinstance(parse_spec(_with(mode={"name": "sync"})).mode, SyncMode)
    e = parse_spec(_with(mode={"name": "elastic", "beta": 0.25, "max_lag": 3})).mode
    assert isinstance(e, ElasticMode) and (e.beta, e.max_lag) == (0.25, 3)
    a = parse_spec(_with(mode={"name": "async", "max_staleness": 0, "on_stale": "wait"})).mode
    assert isinstance(a, AsyncMode) and (a.max_staleness, a.on_stale) == (0, "wait")
    path, msg = _only(_with(mode={"name": "async", "on_stale": "drop"}))
    assert path.startswith("mode.") and path.endswith("on_stale")
    assert "refuse" in msg and "wait" in msg


def test_validate_assignment_keeps_a_spec_valid() -> None:
    spec = parse_spec(_with())
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        spec.workers = 0


# -- every number and list of a spec has a bound ----------------------------------------------


def _walk_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """``(path, annotation, FieldInfo)`` of every field of ``model`` and of its sections."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        yield path, info.annotation, info
        for sub in _models_in(info.annotation):
            yield from _walk_fields(sub, f"{path}.")


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _has(metadata: Sequence[Any], *names: str) -> bool:
    return any(getattr(m, n, None) is not None for m in metadata for n in names)


def _unbounded(annotation: Any, metadata: Sequence[Any], path: str) -> list[str]:
    """What in ``annotation`` (a field's type, its constraints in ``metadata``) lacks a bound."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *extra = typing.get_args(annotation)
        more = [m for e in extra for m in getattr(e, "metadata", [e])]
        return _unbounded(base, [*metadata, *more], path)
    if origin in (typing.Union, types.UnionType):
        return [p for a in typing.get_args(annotation) for p in _unbounded(a, metadata, path)]
    if origin is list:
        (item,) = typing.get_args(annotation)
        missing = [] if _has(metadata, "max_length") else [f"{path} (list length)"]
        return missing + _unbounded(item, [], f"{path}[]")
    if annotation in (int, float):
        lo = _has(metadata, "ge", "gt")
        hi = _has(metadata, "le", "lt")
        return [] if lo and hi else [f"{path} ({annotation.__name__})"]
    return []


def test_every_number_and_list_of_the_spec_has_a_bound() -> None:
    missing = [
        p
        for path, annotation, info in _walk_fields(JobSpec)
        for p in _unbounded(annotation, info.metadata, path)
    ]
    # worker_gpus is float | "auto": its range is checked by ResourcesSpec's validator
    assert missing == ["resources.worker_gpus (float)"]
    with pytest.raises(SpecError, match=r"resources.worker_gpus"):
        parse_spec({**BASE, "resources": {"worker_gpus": 1e30}})


@pytest.mark.parametrize(
    ("patch", "path", "allowed"),
    [
        ({"faults": [{"kind": "drop", "steps": [10**30]}]}, "faults.0.steps.0", "<= 100000000"),
        ({"faults": [{"kind": "drop", "steps": list(range(10_001))}]}, "faults.0.steps", "items"),
        ({"faults": [{"kind": "drop", "at_step": 1}] * 1001}, "faults", "at most 1000 items"),
        ({"model": {"name": "mlp", "hidden": [8] * 33}}, "model.hidden", "at most 32 items"),
        ({"scale_plan": [{"at_step": 1, "workers": 1}] * 1001}, "scale_plan", "1000 items"),
        ({"faults": [{"kind": "crash", "workers": [0] * 4097}]}, "faults.0.workers", "4096"),
        ({"steps": 10**30}, "steps", "<= 100000000"),
    ],
)
def test_huge_numbers_and_lists_are_refused_with_the_field_and_its_bound(
    patch: dict[str, Any], path: str, allowed: str
) -> None:
    with pytest.raises(SpecError) as ei:
        parse_spec({**BASE, **patch})
    problems = dict(ei.value.problems)
    assert path in problems, problems
    assert allowed in problems[path]


# -- the optimizer: kinds, schedules, groups ---------------------------------------------------


@pytest.mark.parametrize(
    ("optimizer", "path", "says"),
    [
        ({"name": "adam", "momentum": 0.9}, "optimizer.momentum", "belongs to sgd"),
        ({"name": "adamw", "nesterov": True}, "optimizer.nesterov", "belongs to sgd"),
        ({"betas": [0.9, 0.99]}, "optimizer.betas", "belongs to adam"),
        ({"name": "sgd", "eps": 1e-6}, "optimizer.eps", "belongs to adam"),
        ({"name": "adamw", "betas": [0.9, 1.0]}, "optimizer.betas.1", "< 1"),
        ({"name": "adam", "eps": 0}, "optimizer.eps", "> 0"),
        ({"name": "rmsprop"}, "optimizer.name", "adamw"),
        (
            {"schedule": {"name": "warmup_cosine", "warmup_steps": -1}},
            "optimizer.schedule.warmup_steps",
            ">= 0",
        ),
        (
            {"schedule": {"name": "warmup_cosine", "min_lr_ratio": 2}},
            "optimizer.schedule.min_lr_ratio",
            "<= 1",
        ),
        ({"schedule": {"name": "step"}}, "optimizer.schedule.step_size", "required"),
        (
            {"schedule": {"name": "step", "step_size": 5, "gamma": 0}},
            "optimizer.schedule.gamma",
            "> 0",
        ),
        ({"clip_grad_norm": 0}, "optimizer.clip_grad_norm", "> 0"),
        ({"param_groups": [{"match": "(("}]}, "optimizer.param_groups.0.match", "regular"),
        (
            {"param_groups": [{"match": "bias", "lr_scale": -1}]},
            "optimizer.param_groups.0.lr_scale",
            ">= 0",
        ),
    ],
)
def test_bad_optimizer_values_name_their_field(
    optimizer: dict[str, Any], path: str, says: str
) -> None:
    got_path, msg = _only(_with(optimizer=optimizer))
    assert got_path == path and says in msg, (got_path, msg)


def test_an_adamw_spec_with_schedule_and_groups_round_trips() -> None:
    opt = {
        "name": "adamw",
        "lr": 3e-4,
        "betas": [0.9, 0.95],
        "weight_decay": 0.1,
        "schedule": {"name": "warmup_cosine", "warmup_steps": 100, "min_lr_ratio": 0.1},
        "clip_grad_norm": 1.0,
        "param_groups": [{"match": r"embed", "lr_scale": 0.5}],
        "no_decay_bias_and_norm": True,
    }
    spec = parse_spec(_with(optimizer=opt))
    assert spec.optimizer.adaptive and spec.optimizer.adam_betas == (0.9, 0.95)
    assert parse_spec(spec.model_dump()) == spec  # the dump's sgd "off" values are no setting
    sgd = parse_spec(_with(optimizer={"lr": 0.1, "momentum": 0.9}))
    assert parse_spec(sgd.model_dump()) == sgd and sgd.optimizer.adam_eps == 1e-8


def test_a_task_job_dumped_and_validated_again_is_the_same_job() -> None:
    """The store keeps ``model_dump()`` of a spec and validates it again (reconcile, drills):
    the built-in task's defaults in it are not a second task."""
    from core.spec import JobSpec

    spec = parse_spec({"task": {"entrypoint": "cnn_digits.task:build"}, "steps": 5})
    for dumped in (spec.model_dump(), spec.model_dump(mode="json")):
        assert JobSpec.model_validate(dumped) == spec
