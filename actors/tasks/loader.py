"""Loading a job's task: from its entrypoint (``pkg.module:attr``) or the built-in one.

:func:`job_task` is the one way every process of a job gets its task object: the service
(at submission, to validate it and count its parameters), the coordinator and each worker
(each builds its own). A spec without ``task`` gets the built-in task
(:mod:`actors.tasks.builtin`) with its ``model`` and ``dataset`` sections as params; a spec
with one resolves the entrypoint:

* the module is imported and the attribute looked up (``attr`` may be dotted);
* it must be callable with one argument, the params: a :class:`~actors.tasks.base.Task`
  subclass or a function returning a ``Task``;
* when that argument is annotated with a pydantic model, the params are validated into it
  first (errors are reported under ``task.params.<field>``), else it gets the plain dict.

Every failure is a :class:`~core.errors.SpecError` naming ``task.entrypoint`` or
``task.params...``, so the service answers 422 and a worker's message says the same.
Importing a module runs its code: the service checks :func:`check_allowed` (the operator's
module prefixes) *before* anything is imported.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from actors.tasks.base import Task
from actors.tasks.builtin import BuiltinParams, BuiltinTask
from core.errors import SpecError
from core.spec import JobSpec, TaskSpec, format_errors

ENTRYPOINT = "task.entrypoint"


def allowed(module: str, prefixes: Sequence[str]) -> bool:
    """Whether ``module`` is one of ``prefixes`` or inside one (``a.b`` is inside ``a``,
    ``ab`` is not)."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def check_allowed(task: TaskSpec, prefixes: Sequence[str]) -> None:
    """Refuse an entrypoint outside the operator's module prefixes (nothing is imported).

    Raises:
        SpecError: naming ``task.entrypoint`` and the allowed prefixes.
    """
    if not allowed(task.module, prefixes):
        shown = ", ".join(prefixes) if prefixes else "none"
        raise SpecError(
            [
                (
                    ENTRYPOINT,
                    f"module {task.module!r} is not allowed here; the service loads tasks "
                    f"only under the module prefixes {shown} (the operator's "
                    "ESGD_TASK_MODULES setting)",
                )
            ]
        )


def add_import_paths(paths: Sequence[Path]) -> None:
    """Put ``paths`` at the front of ``sys.path`` (once each): where the service finds the
    packages it hands to Ray as ``py_modules``/``working_dir``, to validate their tasks."""
    for p in reversed([str(p) for p in paths]):
        if p not in sys.path:
            sys.path.insert(0, p)


def resolve(entrypoint: str) -> Callable[..., Any]:
    """The callable an entrypoint names.

    Raises:
        SpecError: the module cannot be imported, the attribute is missing or not callable.
    """
    module_name, _, attr = entrypoint.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise SpecError(
            [
                (
                    ENTRYPOINT,
                    f"no module {exc.name or module_name!r} (importing {module_name!r}): install "
                    "the task's package where the service and Ray's workers run, or have the "
                    "operator ship it (ESGD_RUNTIME_ENV_PY_MODULES)",
                )
            ]
        ) from None
    except Exception as exc:
        raise SpecError(
            [(ENTRYPOINT, f"importing {module_name!r} raised {type(exc).__name__}: {exc}")]
        ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SpecError([(ENTRYPOINT, f"module {module_name!r} has no attribute {attr!r}")])
        obj = getattr(obj, part)
    if not callable(obj):
        raise SpecError([(ENTRYPOINT, f"{entrypoint} is not callable (a Task class or function)")])
    return typing.cast(Callable[..., Any], obj)


def params_model(fn: Callable[..., Any]) -> type[BaseModel] | None:
    """The pydantic model the entrypoint's one argument is annotated with, if any.

    Raises:
        SpecError: the entrypoint does not take exactly one argument.
    """
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    required = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    positional = [
        p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(required) > 1 or not positional:
        raise SpecError(
            [(ENTRYPOINT, "the entrypoint must take one argument, the params (a dict or model)")]
        )
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - unresolvable annotations: treat as a plain dict
        return None
    ann = hints.get(positional[0].name)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    return None


def build_task(task: TaskSpec) -> Task:
    """Resolve ``task.entrypoint`` and call it with its (validated) params.

    Raises:
        SpecError: the entrypoint cannot be resolved, refuses its params, or does not
            return a :class:`Task`.
    """
    fn = resolve(task.entrypoint)
    model = params_model(fn)
    arg: Any = task.params
    if model is not None:
        try:
            arg = model.model_validate(task.params)
        except ValidationError as exc:
            raise SpecError(format_errors(exc, prefix="task.params.")) from None
    made = fn(arg)
    if not isinstance(made, Task):
        raise SpecError(
            [
                (
                    ENTRYPOINT,
                    f"{task.entrypoint} returned {type(made).__name__}, not a "
                    "actors.tasks.Task (subclass Task, or return an instance of one)",
                )
            ]
        )
    return made


def job_task(spec: JobSpec, data_dir: Path | None = None) -> Task:
    """The task of a job: its entrypoint's, or the built-in one of ``model``/``dataset``.

    Raises:
        SpecError: as :func:`build_task`.
    """
    if spec.task is None:
        return BuiltinTask(BuiltinParams(model=spec.model, dataset=spec.dataset), data_dir)
    return build_task(spec.task)
