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
from actors.schedules import lr_ratio
from actors.warmup import Constants
from core.errors import SpecError
from core.spec import AsyncMode, ElasticMode, JobSpec, ModeSpec, StragglerMode

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
    ``total_steps`` steps). The mode's term is in units of the lr of the steps that opened
    a view's gap; B̂ divides by the current one, so the term is scaled by how much larger
    the lr was up to :func:`gap_steps` steps back (:func:`actors.schedules.lr_ratio`; 1 for
    a constant lr)."""
    term = mode_class(spec).bound_term(spec, c)
    if term > 0.0:
        term *= lr_ratio(spec.applied_optimizer(), total_steps, gap_steps(spec.mode))
    return term + shared_bound_terms(spec, c, q, error_feedback, lost_fraction, total_steps)


def gap_steps(mode: ModeSpec) -> int:
    """How many steps back the updates a view misses can reach: ``max_lag`` (elastic,
    straggler) or ``tau`` (async), plus one because B̂ divides by the lr of the *next* step
    to apply; one otherwise (a local round's replicas run at the round's lr)."""
    if isinstance(mode, ElasticMode | StragglerMode):
        return mode.max_lag + 1
    if isinstance(mode, AsyncMode):
        return mode.max_staleness + 1
    return 1
