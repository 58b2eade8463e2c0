"""Tasks: what a job trains (the interface, the built-in tasks, loading by import path)."""

from actors.tasks.base import Task, TaskContext, weighted_means

__all__ = ["Task", "TaskContext", "weighted_means"]
