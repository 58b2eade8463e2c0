"""Every fault kind's class, by :class:`~core.events.FaultKind` (one line per kind).

Adding a kind: a value in ``FaultSpec.kind`` (``core/spec.py``) and in ``FaultKind``
(``core/events.py``), a module here with its :class:`~actors.faults.base.FaultType`, and
its line below. The engine and the worker ask every registered kind, in ``order``.
"""

from __future__ import annotations

from actors.faults.base import FaultType
from actors.faults.coordinator_crash import CoordinatorCrash
from actors.faults.corrupt import Corrupt
from actors.faults.crash import Crash
from actors.faults.delay import Delay
from actors.faults.drop import Drop
from actors.faults.partition import Partition
from core.events import FaultKind

FAULT_TYPES: dict[FaultKind, type[FaultType]] = {
    FaultKind.CRASH: Crash,
    FaultKind.DROP: Drop,
    FaultKind.DELAY: Delay,
    FaultKind.PARTITION: Partition,
    FaultKind.COORDINATOR_CRASH: CoordinatorCrash,
    FaultKind.CORRUPT: Corrupt,
}


def fault_types() -> list[FaultType]:
    """One instance of every registered kind, in the order they are asked."""
    return sorted((cls() for cls in FAULT_TYPES.values()), key=lambda t: t.order)


def fault_type(kind: FaultKind | str) -> FaultType:
    """The class of ``kind`` (a ``FaultKind`` or the spec's kind string).

    Raises:
        KeyError: ``kind`` has no class (``external`` is recorded, never injected).
    """
    return FAULT_TYPES[FaultKind(kind)]()
