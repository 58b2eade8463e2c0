"""The coordinator: model of record, consistency mode, membership, consistency monitor.

A package of collaborators composed by :class:`~actors.coordinator.loop.CoordinatorCore`
(see its module docstring for who does what); :class:`Coordinator` is the Ray actor.
"""

from actors.coordinator.actor import Coordinator
from actors.coordinator.loop import CoordinatorCore

__all__ = ["Coordinator", "CoordinatorCore"]
