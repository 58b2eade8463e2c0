"""When may a worker start its next step? The consistency modes as small, pure rules.

The coordinator owns the vectors; this module owns the *decisions*, on plain numbers, so it
can be tested without Ray or tensors.

Step modes (``sync``, ``straggler``) group gradients into numbered steps. Step ``j``'s update
is the optimizer step on the mean of the gradients that the workers *assigned* to ``j``
sent; applying it turns ``x_j`` into ``x_{j+1}``. Steps are applied strictly in order, so
the model of record is always the consistent model ``x_c`` (``c`` = steps completed).
:class:`StepBook` tracks who was assigned what and which steps are complete.

* ``sync``: a worker starts step ``j+1`` only when every step ``<= j`` is complete.
* ``straggler(beta, max_lag)``: a worker that sent its step-``j`` gradient starts the next
  step once a ``beta`` share of the *other* workers assigned to step ``j`` have sent theirs
  (or step ``j`` is complete; ``beta = 1`` always waits for completion), and never more than
  ``max_lag`` steps ahead of the oldest incomplete step. A worker that fell behind the
  frontier (a straggler) jumps to the frontier instead of replaying old steps; the steps it
  skipped complete without it.
* ``elastic(beta, max_lag)`` applies steps per parameter block; its start rule
  (:class:`BlockShareRule`) looks at the share of the worker's own gradient whose blocks'
  averaged update is applied.

Async mode (``async(tau)``) has no steps: each gradient is an update of its own, and
:class:`AsyncRule` decides whether a gradient computed on a view ``s`` updates old is
applied, refused, or held back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from core.spec import AsyncMode, StragglerMode, SyncMode


@dataclass
class Decision:
    """A rule's answer, with the reason in words (logged and shown in events)."""

    allowed: bool
    reason: str


class StepRule(Protocol):
    """Decides whether a worker may start ``target`` (step modes)."""

    #: True if a worker that fell behind the frontier jumps to it (skipping steps).
    jumps: bool

    def may_start(
        self,
        target: int,
        oldest_incomplete: int | None,
        own_norm: float | None,
        received_share: float | None,
        last_complete: bool,
    ) -> Decision: ...


class SyncRule:
    """Every step ``< target`` must be complete (B = 0)."""

    jumps = False

    def may_start(
        self,
        target: int,
        oldest_incomplete: int | None,
        own_norm: float | None,
        received_share: float | None,
        last_complete: bool,
    ) -> Decision:
        del own_norm, received_share, last_complete  # sync looks at completed steps only
        if oldest_incomplete is None or oldest_incomplete >= target:
            return Decision(True, "all earlier steps applied")
        return Decision(False, f"waiting for step {oldest_incomplete} to complete")


@dataclass
class StragglerRule:
    """Straggler-tolerant steps: wait for a ``beta`` share of the other workers, with a hard
    lag bound.

    Args:
        beta: share of the *other* workers assigned to the worker's last step whose
            gradients must have arrived (0: never wait; 1: wait for the whole step, sync).
        max_lag: how many steps a worker may run ahead of the oldest incomplete step.
    """

    beta: float
    max_lag: int
    jumps: bool = True

    def may_start(
        self,
        target: int,
        oldest_incomplete: int | None,
        own_norm: float | None,
        received_share: float | None,
        last_complete: bool,
    ) -> Decision:
        if oldest_incomplete is not None and target - oldest_incomplete > self.max_lag:
            return Decision(
                False,
                f"step {target} would be more than max_lag={self.max_lag} "
                f"ahead of incomplete step {oldest_incomplete}",
            )
        if last_complete or own_norm is None:
            return Decision(True, "previous step complete")
        if self.beta >= 1.0:  # beta 1 is sync: the whole step must be applied
            return Decision(False, "beta=1: waiting for the previous step to complete")
        got = received_share or 0.0
        if got >= self.beta:
            return Decision(True, f"received {got:.3g} >= beta={self.beta} of the others")
        return Decision(False, f"received {got:.3g} < beta={self.beta} of the others")


@dataclass
class BlockShareRule:
    """The paper's elastic rule on parameter blocks (actors/modes/elastic.py).

    A worker starts its next step once the blocks whose averaged update of its last step is
    applied make up ``>= beta`` of its own last gradient (``applied_share``: the sum of
    those blocks' L2 norms over the sum of every block's), and never more than ``max_lag``
    steps ahead of the oldest incomplete step. ``beta = 1`` needs every block applied (sync),
    even those where the worker's own gradient is 0.

    Args:
        beta: the share in [0, 1].
        max_lag: how many steps a worker may run ahead of the oldest incomplete step.
    """

    beta: float
    max_lag: int

    def may_start(
        self, target: int, oldest_incomplete: int | None, applied_share: float | None
    ) -> Decision:
        """``applied_share`` ``None``: the worker has no outstanding step (fresh, or its
        last step is fully applied)."""
        if oldest_incomplete is not None and target - oldest_incomplete > self.max_lag:
            return Decision(
                False,
                f"step {target} would be more than max_lag={self.max_lag} "
                f"ahead of incomplete step {oldest_incomplete}",
            )
        if applied_share is None:
            return Decision(True, "previous step applied")
        # beta 1 needs every block applied (``None``), not a share of 1: a block whose own
        # gradient is 0 may still lack the others' update, and a float sum can round
        if self.beta < 1.0 and applied_share >= self.beta:
            return Decision(True, f"applied share {applied_share:.3g} >= beta={self.beta}")
        return Decision(False, f"applied share {applied_share:.3g} < beta={self.beta}")


def make_step_rule(mode: SyncMode | StragglerMode) -> StepRule:
    if isinstance(mode, StragglerMode):
        return StragglerRule(beta=mode.beta, max_lag=mode.max_lag)
    return SyncRule()


@dataclass
class StepEntry:
    """Who was handed step ``step``, whose gradient arrived, whose was lost."""

    step: int
    assigned: set[int] = field(default_factory=set)
    arrived: set[int] = field(default_factory=set)
    lost: set[int] = field(default_factory=set)

    @property
    def resolved(self) -> bool:
        return self.assigned <= (self.arrived | self.lost)


class StepBook:
    """Bookkeeping of numbered steps for the step modes (pure; no vectors).

    Args:
        total_steps: steps the job runs; no step ``>= total_steps`` is handed out.
        jumps: whether workers behind the frontier jump to it (elastic) or not (sync).
        start_step: first step (non-zero when resuming from a checkpoint).
    """

    def __init__(self, total_steps: int, jumps: bool, start_step: int = 0) -> None:
        self.total_steps = total_steps
        self.jumps = jumps
        self.completed = start_step  # steps < completed are applied to the model of record
        self.frontier = start_step - 1  # highest step handed out so far
        self.open: dict[int, StepEntry] = {}
        self.worker_step: dict[int, int | None] = {}  # live worker -> last assigned step

    # -- membership -------------------------------------------------------------------
    def join(self, worker: int) -> None:
        self.worker_step[worker] = None

    def leave(self, worker: int) -> list[int]:
        """Remove a worker; its unsent gradients leave the steps it was assigned.

        Returns:
            The steps it left without a gradient.
        """
        self.worker_step.pop(worker, None)
        left = []
        for entry in self.open.values():
            if worker in entry.assigned and worker not in entry.arrived:
                entry.assigned.discard(worker)
                entry.lost.discard(worker)
                left.append(entry.step)
        return left

    @property
    def live(self) -> list[int]:
        return sorted(self.worker_step)

    # -- the step a worker would take next --------------------------------------------------
    def next_step(self, worker: int) -> int:
        last = self.worker_step.get(worker)
        if last is None:
            # a new worker joins the newest step not yet applied (its completion waits
            # for every live worker without a step, so that step is still open)
            return max(self.frontier, self.completed)
        if self.jumps:
            return max(last + 1, self.frontier)
        return last + 1

    def _closed(self, step: int) -> bool:
        """No live worker can still be assigned ``step``."""
        if self.jumps and self.frontier > step:
            return True
        return all(s is not None and s >= step for s in self.worker_step.values())

    @property
    def oldest_incomplete(self) -> int | None:
        return min(self.open) if self.open else None

    def finished(self) -> bool:
        return self.completed >= self.total_steps

    # -- events --------------------------------------------------------------------------
    def assign(self, worker: int, step: int) -> None:
        if step >= self.total_steps:
            raise ValueError(f"step {step} is past the last step {self.total_steps - 1}")
        if step < self.completed:
            raise ValueError(f"step {step} is already applied")
        self.worker_step[worker] = step
        self.frontier = max(self.frontier, step)
        self.open.setdefault(step, StepEntry(step)).assigned.add(worker)

    def arrive(self, worker: int, step: int) -> bool:
        """Record a gradient; False if it is not expected (unknown step or worker)."""
        entry = self.open.get(step)
        if entry is None or worker not in entry.assigned or worker in entry.arrived:
            return False
        entry.arrived.add(worker)
        return True

    def lose(self, worker: int, step: int) -> None:
        """The worker's step gradient is known lost (a dropped message)."""
        entry = self.open.get(step)
        if entry is not None and worker in entry.assigned and worker not in entry.arrived:
            entry.lost.add(worker)

    def completable(self) -> StepEntry | None:
        """The oldest incomplete step, if it can be applied now."""
        entry = self.open.get(self.completed)
        if entry is None:
            return None
        if entry.resolved and self._closed(entry.step):
            return entry
        return None

    def complete(self, step: int) -> StepEntry:
        if step != self.completed:
            raise ValueError(f"steps complete in order: expected {self.completed}, got {step}")
        entry = self.open.pop(step)
        self.completed += 1
        # a step nobody was assigned (everyone jumped past it) cannot exist; skip holes
        while self.completed not in self.open and self.completed <= self.frontier:
            self.completed += 1
        return entry


@dataclass
class AsyncRule:
    """Bounded staleness: a gradient on a view ``s`` updates old is stale when ``s > tau``.

    Args:
        max_staleness: tau.
        on_stale: ``refuse`` stale gradients, or ``wait`` (hold fresher updates back so
            that no outstanding gradient can become stale).
    """

    max_staleness: int
    on_stale: Literal["refuse", "wait"]

    def verdict(self, version_now: int, view_version: int) -> Literal["apply", "refuse"]:
        # past tau: refused in either mode (``wait`` never lets one get there, unless tau
        # was tightened while it was out; holding it would wait for ever)
        if version_now - view_version > self.max_staleness:
            return "refuse"
        return "apply"

    def feasible(self, version: int, views: list[int]) -> bool:
        """Can every outstanding gradient (computed on ``views``) still land within tau?

        Applied oldest view first, starting at ``version``, the k-th (0-based) lands at
        ``version + k``: each needs ``version + k - view <= tau``.
        """
        return all(version + k - v <= self.max_staleness for k, v in enumerate(sorted(views)))

    def may_apply(self, version_now: int, worker_view: int, outstanding: list[int]) -> Decision:
        """May a gradient from a view at ``worker_view`` be applied now (``wait`` mode)?

        Args:
            version_now: updates applied so far.
            worker_view: the version this gradient was computed on.
            outstanding: view versions of *other* live workers still computing or held.
        """
        if self.on_stale != "wait":
            return Decision(True, "refuse mode applies at once")
        if version_now - worker_view > self.max_staleness:
            return Decision(False, "this gradient is already past max_staleness")
        if self.feasible(version_now + 1, outstanding):
            return Decision(True, "staleness bound kept for every outstanding gradient")
        late = [
            v
            for k, v in enumerate(sorted(outstanding))
            if version_now + 1 + k - v > self.max_staleness
        ]
        return Decision(
            False,
            f"holding: a gradient on view {late[0]} would exceed "
            f"max_staleness={self.max_staleness}",
        )

    def may_dispatch(self, version_now: int, outstanding: list[int]) -> Decision:
        """May another worker start on the current model (``wait`` mode)?"""
        if self.on_stale != "wait" or self.feasible(version_now, [*outstanding, version_now]):
            return Decision(True, "room within max_staleness")
        return Decision(
            False, f"max_staleness={self.max_staleness} allows no more gradients in flight"
        )


def make_async_rule(mode: AsyncMode) -> AsyncRule:
    return AsyncRule(max_staleness=mode.max_staleness, on_stale=mode.on_stale)
