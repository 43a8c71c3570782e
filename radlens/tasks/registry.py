"""Which tasks this installation has: the built-in ones, and those installed packages declare.

A site ships its own task as a pip package that declares, in its ``pyproject.toml``::

    [project.entry-points."radlens.tasks"]
    my_task = "my_package.task:MyTask"

The entry point names a ``radlens.tasks.base.Task`` subclass (or an instance of one). Entry
points are read with ``importlib.metadata`` (the standard library's reader of installed
distributions' metadata); a plug-in that cannot be imported, or that is not a task, is reported
and left out, and a plug-in may not take a built-in task's name. The order is stable: built-in
tasks first, then plug-ins by name.
"""

from __future__ import annotations

import importlib
import logging
from functools import cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from radlens.logs import kv
from radlens.tasks.base import Task, TaskError

if TYPE_CHECKING:
    from radlens.config import Settings

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "radlens.tasks"
BUILT_IN = ("radlens.tasks.breast_us:TASK", "radlens.tasks.mammo_density:TASK",
            "radlens.tasks.dermoscopy:TASK")


def _instance(target: object, origin: str) -> Task:
    task = target() if isinstance(target, type) else target
    if not isinstance(task, Task):
        raise TaskError(f"{origin}: {target!r} is not a radlens.tasks.base.Task")
    if not getattr(task, "name", None):
        raise TaskError(f"{origin}: the task class states no name")
    return task


@cache
def _discovered() -> tuple[tuple[Task, ...], tuple[str, ...]]:
    tasks: dict[str, Task] = {}
    problems: list[str] = []
    for path in BUILT_IN:
        module, _, attribute = path.partition(":")
        task = _instance(getattr(importlib.import_module(module), attribute), "built-in")
        task.origin = "built-in"
        tasks[task.name] = task
    for point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda p: p.name):
        origin = f"{point.dist.name} {point.dist.version}" if point.dist else point.value
        try:
            task = _instance(point.load(), origin)
        except Exception as exc:  # a broken plug-in costs itself, never the agent
            problems.append(f"task plug-in {point.name!r} ({origin}) not loaded: "
                            f"{type(exc).__name__}: {exc}")
            continue
        if task.name in tasks or any(task is known for known in tasks.values()):
            taken = tasks.get(task.name)
            problems.append(f"task plug-in {point.name!r} ({origin}) not loaded: the name "
                            f"{task.name!r} is taken by {taken.origin if taken else 'a task'}")
            continue
        task.origin = origin
        tasks[task.name] = task
    for problem in problems:
        log.error("task plug-in refused", extra=kv(problem=problem))
    return tuple(tasks.values()), tuple(problems)


_configured: dict[str, Task] = {}  # MONAI bundles the configuration names


def configure(settings: Settings) -> list[Task]:
    """The tasks the configuration adds (each ``bundles`` entry), from now on among
    ``all_tasks``. Raises TaskError for a bundle that cannot be read or whose name is taken."""
    from radlens.tasks.monai_bundle import BundleTask

    taken = {task.name: task.origin for task in _discovered()[0]}
    configured: dict[str, Task] = {}
    for bundle in settings.bundles:
        if bundle.name in taken or bundle.name in configured:
            raise TaskError(f"bundles: the name {bundle.name!r} is taken by "
                            f"{taken.get(bundle.name, 'another bundle')}")
        configured[bundle.name] = BundleTask(bundle)
    _configured.clear()
    _configured.update(configured)
    return list(configured.values())


def all_tasks() -> list[Task]:
    """Every task this installation has, built-in first, then plug-ins, then the configured
    bundles."""
    return [*_discovered()[0], *_configured.values()]


def problems() -> list[str]:
    """Why each plug-in that was declared but is not usable was left out."""
    return list(_discovered()[1])


def get_task(name: str) -> Task:
    """The task of this name. Raises TaskError naming those there are."""
    for task in all_tasks():
        if task.name == name:
            return task
    known = ", ".join(task.name for task in all_tasks())
    raise TaskError(f"no task {name!r} (this installation has: {known})")


def reload() -> None:
    """Forget what was discovered (after a package was installed in this process's life)."""
    _discovered.cache_clear()
    _configured.clear()
