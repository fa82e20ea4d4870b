"""Registry of the real-data tasks used by ``lionopt compare`` and ``lionopt sweep``.

Every task reads local files only: data shipped in ``lionopt/tasks/data`` or, for optional
tasks, files installed by the system's package manager. See each module's docstring for the
data's provenance and licence.
"""

from __future__ import annotations

from lionopt.tasks.base import Task, TaskData, TaskUnavailable
from lionopt.tasks.charlm import CharLMTask
from lionopt.tasks.digits import DigitsTask
from lionopt.tasks.fashion import FashionTask
from lionopt.tasks.loader import resolve_task
from lionopt.tasks.tensor import TensorTask

#: name -> task class, in report order.
TASKS: dict[str, type[Task]] = {task.name: task for task in (DigitsTask, CharLMTask, FashionTask)}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]()
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}") from None


__all__ = [
    "TASKS",
    "Task",
    "TaskData",
    "TaskUnavailable",
    "TensorTask",
    "get_task",
    "resolve_task",
]
