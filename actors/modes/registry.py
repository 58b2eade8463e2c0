"""The consistency modes by the spec's mode name, and the analytic bound built from them.

Adding a mode: a config model in ``core/spec.py`` (added to ``ModeSpec``), a module here
implementing :class:`actors.modes.base.Mode`, and one line below.
"""

from __future__ import annotations

from actors.consistency import shared_bound_terms
from actors.modes.asynchronous import AsyncEngine
from actors.modes.base import Mode, ModeContext
from actors.modes.elastic import ElasticEngine
from actors.modes.local import LocalEngine
from actors.modes.straggler import StragglerEngine
from actors.modes.sync import SyncEngine
from actors.warmup import Constants
from core.errors import SpecError
from core.spec import JobSpec

MODES: dict[str, type[Mode]] = {
    "sync": SyncEngine,
    "elastic": ElasticEngine,
    "straggler": StragglerEngine,
    "async": AsyncEngine,
    "local": LocalEngine,
}


def mode_class(spec: JobSpec) -> type[Mode]:
    """The class that runs ``spec.mode``.

    Raises:
        SpecError: no mode of that name is registered.
    """
    try:
        return MODES[spec.mode.name]
    except KeyError:
        raise SpecError(
            [("mode.name", f"unknown mode {spec.mode.name!r}; registered: {sorted(MODES)}")]
        ) from None


def make_mode(ctx: ModeContext) -> Mode:
    """The mode object for ``ctx.spec``."""
    return mode_class(ctx.spec)(ctx)


def analytic_bound(
    spec: JobSpec,
    c: Constants,
    q: float,
    error_feedback: bool,
    lost_fraction: float = 0.0,
    total_steps: int = 0,
) -> float:
    """The bound on B for this run, from the frozen constants ``c``: the mode's term plus
    the terms every mode shares (``lost_fraction``: the plan's drop share over
    ``total_steps`` steps)."""
    return mode_class(spec).bound_term(spec, c) + shared_bound_terms(
        spec, c, q, error_feedback, lost_fraction, total_steps
    )
