"""The service's side of tasks: which entrypoints it may import, and how user code reaches
Ray's workers.

Importing a module named in an HTTP request runs its code, so :func:`validate_task` first
checks the entrypoint's module against the operator's prefixes (``ESGD_TASK_MODULES``) and
imports nothing outside them; then it resolves the entrypoint and validates its params
exactly as the coordinator and the workers will (:func:`actors.tasks.loader.build_task`),
so a bad task is a 422 at submission naming ``task.entrypoint`` or ``task.params...``.

User code reaches the actors either as an installed package (on every node's Python), or
through Ray's ``runtime_env`` built from the operator's settings
(:func:`runtime_env`: ``py_modules`` directories and a ``working_dir``), set on the job's
coordinator actor; the workers it creates inherit it (Ray's runtime_env inheritance). The
service adds the same directories to its own import path to validate the tasks they hold.
"""

from __future__ import annotations

from typing import Any

from core.errors import SpecError
from core.spec import TaskSpec
from service.settings import Settings


def runtime_env(settings: Settings) -> dict[str, Any] | None:
    """The ``runtime_env`` of a job's actors from the settings (``None``: none set)."""
    env: dict[str, Any] = {}
    if settings.runtime_env_py_modules:
        env["py_modules"] = [str(p) for p in settings.runtime_env_py_modules]
    if settings.runtime_env_working_dir is not None:
        env["working_dir"] = str(settings.runtime_env_working_dir)
    return env or None


def validate_task(task: TaskSpec, settings: Settings) -> None:
    """Refuse a task the service may not or cannot load (see the module docstring).

    Raises:
        SpecError: naming ``task.entrypoint`` (not allowed, missing, raised while being
            made) or ``task.params.<field>`` (refused by the task's params model).
    """
    from actors.tasks.loader import add_import_paths, build_task, check_allowed

    check_allowed(task, settings.task_modules)
    add_import_paths(settings.import_paths)
    try:
        build_task(task)
    except SpecError:
        raise
    except Exception as exc:
        raise SpecError(
            [
                (
                    "task.entrypoint",
                    f"{task.entrypoint}({{params}}) raised {type(exc).__name__}: {exc}",
                )
            ]
        ) from exc
