"""Find a task by name: a shipped one (``digits``), ``FILE.py:NAME`` or ``module:NAME``.

``NAME`` is a :class:`~lionopt.tasks.Task` instance, a ``Task`` subclass (instantiated with no
arguments) or a callable returning a task. Worker processes call :func:`resolve_task` with
the same spec, so a user's task is rebuilt in each worker rather than pickled.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from lionopt.tasks.base import Task


def _load_file(path: Path):
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"_lionopt_user_task_{key}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[module_name]
        raise
    return module


def resolve_task(spec: str) -> Task:
    """The task named by ``spec``; a clear ``ValueError`` when it cannot be found or built."""
    from lionopt.tasks import TASKS  # the registry imports this module's users, not this one

    if spec in TASKS:
        return TASKS[spec]()
    if ":" not in spec:
        raise ValueError(
            f"unknown task {spec!r}; choose from {', '.join(TASKS)}, or give FILE.py:NAME or "
            "module:NAME"
        )
    where, name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py") or Path(where).is_file():
            path = Path(where)
            if not path.is_file():
                raise ValueError(f"--task {spec}: no such file {where}")
            module = _load_file(path)
        else:
            module = importlib.import_module(where)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(
            f"--task {spec}: importing {where} failed: {type(exc).__name__}: {exc}"
        ) from exc
    try:
        obj = getattr(module, name)
    except AttributeError:
        raise ValueError(f"--task {spec}: {where} has no attribute {name!r}") from None
    try:
        if isinstance(obj, type) and issubclass(obj, Task):
            task = obj()
        elif isinstance(obj, Task):
            task = obj
        elif callable(obj):
            task = obj()
        else:
            task = obj
    except Exception as exc:
        raise ValueError(
            f"--task {spec}: building the task failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(task, Task):
        raise ValueError(
            f"--task {spec}: expected a lionopt.tasks.Task, a Task subclass or a callable "
            f"returning one, got {type(task).__name__}"
        )
    if not task.name:
        raise ValueError(f"--task {spec}: the task has no name")
    return task
