"""WHAT IS LEARNED: tasks (model + loss + metrics) and packaged model resolution."""

from fedfm.tasks.base import Task, build_task, register_task, tasks
from fedfm.tasks.packages import known_packages, register_model_package, resolve_package
from fedfm.tasks import causal_lm, text_classification  # noqa: F401  (registers the tasks)
from fedfm.tasks import dpo  # noqa: F401  (registers the dpo objective)
from fedfm.tasks.objectives import objectives, register_objective
from fedfm.tasks import masked_lm  # noqa: F401  (registers masked_lm)
from fedfm.tasks import verbalizer  # noqa: F401  (registers lm_classification)

__all__ = [
    "Task",
    "build_task",
    "known_packages",
    "objectives",
    "register_objective",
    "register_model_package",
    "register_task",
    "resolve_package",
    "tasks",
]
