"""Training objectives of the causal LM task other than next-token prediction, and their
registry (YAML ``model.objective: {name: NAME, ...params}``).

An objective replaces the task's ``encode``, ``collate``, ``loss``, ``evaluate`` and
``finish``, and gets the task's ``bind_initial`` (the tuned model and its initial State); the model, the tokenizer, the tuner, the learners, codecs and aggregators stay
the same, so an objective composes with all of them. Without ``model.objective`` the task
keeps its own objective (next-token cross-entropy, response-only on instruction pairs).
"""

from __future__ import annotations

from typing import Any, Callable

from pydantic import BaseModel

from fedfm.core.registry import NoParams, Registry

ObjectiveFactory = Callable[[BaseModel], Any]
objectives: Registry[ObjectiveFactory] = Registry("model.objective")
# Tasks that accept ``model.objective``.
OBJECTIVE_TASKS = ("causal_lm",)


def register_objective(name: str, factory: ObjectiveFactory, params: type[BaseModel] = NoParams) -> ObjectiveFactory:
    return objectives.register(name, factory, params)


def build_objective(spec) -> Any | None:
    """The objective named by ``model.objective`` (None: the task's own)."""
    if spec is None:
        return None
    params = objectives.parse(spec.name, spec.params(), "model.objective")
    return objectives.get(spec.name).obj(params)


def objective_problems(exp) -> list[str]:
    """Config-time check: the task takes objectives."""
    spec = exp.model.objective
    if spec is None or exp.model.task in OBJECTIVE_TASKS:
        return []
    return [f"model.objective: '{spec.name}' needs model.task in {list(OBJECTIVE_TASKS)}, got '{exp.model.task}'"]
