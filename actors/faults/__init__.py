"""Fault injection: faults are first-class inputs, one class per kind behind one interface.

* :mod:`~actors.faults.plan` binds a job's ``faults`` specs to their targets
  (:func:`bind_plan`, :class:`ActiveFault`);
* :mod:`~actors.faults.base` is the interface of a kind (:class:`FaultType`: hooks on tick,
  on reply, on gradient), and one module per kind implements it: ``crash``, ``drop``,
  ``delay``, ``partition``, ``coordinator_crash``, ``corrupt``;
* :mod:`~actors.faults.registry` maps each :class:`~core.events.FaultKind` to its class;
* :mod:`~actors.faults.engine` is the coordinator's side (:class:`FaultEngine`: which fault
  fires now), :mod:`~actors.faults.worker` the worker's (:class:`WorkerFaults`: what
  happens to a gradient); both return typed decisions (:mod:`~actors.faults.actions`) that
  the actors carry out;
* :mod:`~actors.faults.screen` is the coordinator's defence against corrupt gradients
  (non-finite ones are refused, never applied).

All of it is pure logic (no Ray), tested in ``tests/unit/test_faults_*.py``.
"""

from actors.faults.actions import (
    Corruption,
    CorruptOn,
    DelayOn,
    GradientEffect,
    KillCoordinator,
    KillWorker,
    PartitionHeal,
    PartitionStart,
    ReplyVerdict,
    TickAction,
)
from actors.faults.base import FaultType, Memo, Tick
from actors.faults.engine import FaultEngine
from actors.faults.plan import ActiveFault, bind_plan, resolve_targets
from actors.faults.registry import FAULT_TYPES, fault_type, fault_types
from actors.faults.screen import GradientVerdict, screen_gradient
from actors.faults.worker import WorkerFaults

__all__ = [
    "FAULT_TYPES",
    "ActiveFault",
    "CorruptOn",
    "Corruption",
    "DelayOn",
    "FaultEngine",
    "FaultType",
    "GradientEffect",
    "GradientVerdict",
    "KillCoordinator",
    "KillWorker",
    "Memo",
    "PartitionHeal",
    "PartitionStart",
    "ReplyVerdict",
    "Tick",
    "TickAction",
    "WorkerFaults",
    "bind_plan",
    "fault_type",
    "fault_types",
    "resolve_targets",
    "screen_gradient",
]
