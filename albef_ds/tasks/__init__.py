"""Tasks: one module per task, named as the task (`task: retrieval` -> tasks/retrieval.py), each
defining TASK (a albef_ds.tasks.base.Task subclass). Adding a task is adding its module."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Optional

from ..config import Config, ConfigError
from .base import Task

# Modules of this package that are not tasks: shared parts of several tasks.
_PARTS = {"base", "objectives", "momentum", "contrastive", "eval_pictures"}


def task_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _PARTS)


def task_class(name: str) -> type[Task]:
    if not isinstance(name, str) or name not in task_names():
        raise ConfigError(f"task '{name}' is not one of {', '.join(task_names())}")
    return importlib.import_module(f"{__name__}.{name}").TASK


def get_task(cfg: Config) -> Task:
    return task_class(cfg.task)(cfg)


def recognise_release(keys: set) -> Optional[type[Task]]:
    """The task whose released ALBEF checkpoint has these keys (None: no ALBEF checkpoint)."""
    return next((cls for cls in map(task_class, task_names()) if cls.is_release(keys)), None)
