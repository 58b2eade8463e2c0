"""A job's metrics as TensorBoard event files (``tensorboard: true`` in its spec).

:class:`JobRunner` hands every record it polls to a :class:`TensorBoardLog`, which writes
them with ``torch.utils.tensorboard.SummaryWriter`` under ``<job folder>/tensorboard``
(``tensorboard --logdir <state dir>/runs`` then shows every job of a service side by
side). The x axis is the job's step; the wall time is the record's own. Tags:

=============================  ==============================================
tag                            value (from the record)
=============================  ==============================================
``train/loss``                 a step's training loss (skipped when unknown)
``train/samples_per_s``        the step's throughput
``train/workers``              the workers whose gradients the step applied
``train/refused``              gradients refused at the step (non-finite, ...)
``consistency/b_hat``          B̂ of the step: max ||x - v|| / step size, over the views
``consistency/b_hat_max``      the running maximum of B̂
``consistency/bound``          the stated bound (once the warm-up has frozen it)
``consistency/b_hat_to_bound`` B̂ / bound (above 1: out of bound)
``eval/<metric>``              every metric of an evaluation (``test_loss``, ...)
=============================  ==============================================

A run that goes back in steps (a coordinator restarted from its checkpoint, the guard
rolling back, a service re-attaching to the job or resuming it) writes the steps it repeats
again, and TensorBoard shows the new ones only: a step record whose step is not past the
last step record written opens a new event file with TensorBoard's ``purge_step`` at that
step (readers then hide everything an earlier file holds from that step on), and so does
the first step record a :class:`TensorBoardLog` writes (an earlier process may have
written the steps it repeats). Evaluations never start a purge: the final one may share
its step with the last periodic one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.events import Record, StepRecord

if TYPE_CHECKING:  # torch.utils.tensorboard is imported only by jobs that ask for it
    from torch.utils.tensorboard import SummaryWriter

# The folder of a job's event files, inside the job's folder.
TENSORBOARD_DIR = "tensorboard"


@dataclass(frozen=True)
class Scalar:
    """One point of one TensorBoard chart."""

    tag: str
    value: float
    step: int
    wall_time: float


def scalars_of(record: Record) -> list[Scalar]:
    """The points a record adds (see the module's table); values that are unknown or not
    finite are left out (TensorBoard draws no gap, it would draw a wrong point)."""
    if isinstance(record, StepRecord):
        ratio = (
            record.b_hat / record.bound if record.bound is not None and record.bound > 0 else None
        )
        values: list[tuple[str, float | None]] = [
            ("train/loss", record.loss),
            ("train/samples_per_s", record.samples_per_s),
            ("train/workers", float(record.workers)),
            ("train/refused", float(record.refused)),
            ("consistency/b_hat", record.b_hat),
            ("consistency/b_hat_max", record.b_hat_max),
            ("consistency/bound", record.bound),
            ("consistency/b_hat_to_bound", ratio),
        ]
    else:
        values = [(f"eval/{name}", v) for name, v in sorted(record.metrics.items())]
    return [
        Scalar(tag, float(v), record.step, record.wall_time)
        for tag, v in values
        if v is not None and math.isfinite(v)
    ]


class TensorBoardLog:
    """The event files of one job (opened at the first record, flushed after each batch).

    Args:
        log_dir: the folder of the event files (``<job folder>/tensorboard``).
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer: SummaryWriter | None = None
        # the last step record's step: a step record not past it repeats steps
        # (None: this log wrote no step record yet, an earlier process may have)
        self._last_step: int | None = None

    def write(self, records: Iterable[Record]) -> None:
        """Add the records' points, then flush them to disk (a reader sees them at once)."""
        wrote = False
        for r in records:
            if isinstance(r, StepRecord) and (self._last_step is None or r.step <= self._last_step):
                self._open(purge_step=r.step)
            elif self._writer is None:
                self._open(purge_step=None)
            writer = self._writer
            assert writer is not None
            for s in scalars_of(r):
                writer.add_scalar(s.tag, s.value, global_step=s.step, walltime=s.wall_time)
            if isinstance(r, StepRecord):
                self._last_step = r.step
            wrote = True
        if wrote and self._writer is not None:
            self._writer.flush()

    def _open(self, purge_step: int | None) -> None:
        """A new event file; with ``purge_step``, readers hide earlier files' points from
        that step on."""
        from torch.utils.tensorboard import SummaryWriter

        self.close()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def close(self) -> None:
        """Flush and close the current event file (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


__all__ = ["TENSORBOARD_DIR", "Scalar", "TensorBoardLog", "scalars_of"]
