"""Fault-injection drills: a job with a fault plan, and the criteria it must meet.

One concern per module:

* :mod:`~service.drills.spec`: :class:`DrillSpec` (a drill file), :class:`DrillCriteria`,
  :func:`parse_drill`, :func:`load_drill`;
* :mod:`~service.drills.analyse`: the verdict, coverage of every planned fault and recovery
  timings, from typed events and records (pure);
* :mod:`~service.drills.report`: ``report.json`` and ``report.md``;
* :mod:`~service.drills.plot`: ``report.png`` (loss, accuracy, B̂, faults marked);
* :mod:`~service.drills.run`: the local runner (``elastic-sgd drill FILE --out DIR``);
* :mod:`~service.drills.service`: :class:`~service.drills.service.DrillService`, behind
  ``POST /drills``.

Both the local runner and the service analyse, report and plot with the same functions;
only where the events and records come from differs (the run's files, or the store).
This package imports only the light spec module; the others are imported by name.
"""

from service.drills.spec import DrillCriteria, DrillSpec, load_drill, parse_drill

__all__ = ["DrillCriteria", "DrillSpec", "load_drill", "parse_drill"]
