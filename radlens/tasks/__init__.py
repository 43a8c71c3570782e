"""Analysis tasks: each model with everything around it, one package per task.

``base`` says what a task is (the interface the agent, the writers and the reporting modules
use), ``registry`` which tasks this installation has (built-in and from installed packages),
and each sub-package is one task's whole code. docs/tasks.md tells how to write one.
"""

from radlens.tasks.base import AnalysisUnit, LoadedTask, Task, TaskError

__all__ = ["AnalysisUnit", "LoadedTask", "Task", "TaskError"]
