"""The server pipeline: composable steps around the aggregation rule.

One round on the server, in this order (``runtime/algorithm.py`` runs it):

    updates --[steps at stage "updates"]--> rule --> server part (FedDyn/SCAFFOLD)
            --[steps at stage "delta"]--> server optimizer --[steps at stage "model"]--> model

- ``updates`` steps see the decoded, validated updates of the round (a list of
  ``Update``) and may change or drop them: per-client clipping, norm bounding, simulated
  omniscient attacks.
- ``delta`` steps see the combined pseudo-gradient (a State): central DP noise.
- ``model`` steps see the new global State and may use the one base model through
  ``RoundContext.workbench``: watermark embedding.

A step is an object with ``name``, ``stage`` and ``__call__(value, ctx, state)``; its
``state`` is a State kept in the server state under ``step.<index>.<name>`` (so two steps
of the same kind do not collide), checkpointed with the rest, and its metrics go into
metrics.jsonl under ``<name>.<key>``. Steps are listed in YAML under ``server_steps``:
``server_steps: [{name: clip_updates, max_norm: 1.0}]``, and added with
``register_server_step(name, factory, params)``.

Per-client broadcasts: a step declares ``client_state``: None, or ``(cid, model, own) -> State``
(``own`` = its server-state group); ``FedAlgorithm.configure`` then sends each client the
State that hook returns instead of the global one (``per_client``). Used by
``ip/copies.py`` (client-unique watermarked copies); the State must keep the global
State's names and shapes, since the client's update is a delta against what it received.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from pydantic import BaseModel

from fedfm.core.protocols import RoundContext, ServerStep
from fedfm.core.registry import NoParams, Registry, parse_named
from fedfm.core.types import ServerState, State

STAGES = ("updates", "delta", "model")
STEP_MEMBERS = ("name", "stage", "client_state")  # and __call__
StepFactory = Callable[[BaseModel], ServerStep]
server_steps: Registry[StepFactory] = Registry("server_steps")


def register_server_step(name: str, factory: StepFactory, params: type[BaseModel] = NoParams) -> StepFactory:
    return server_steps.register(name, factory, params)


def parse_step(spec: dict[str, Any], where: str) -> tuple[str, BaseModel]:
    return parse_named(server_steps, spec, where, "{name: clip_updates, max_norm: 1.0}")


def build_step(spec: dict[str, Any], where: str) -> ServerStep:
    name, params = parse_step(spec, where)
    step = server_steps.get(name).obj(params)
    missing = [m for m in STEP_MEMBERS if not hasattr(step, m)]
    if missing:
        raise ValueError(f"{where}: server step '{name}' ({type(step).__name__}) lacks {missing}: declare them "
                         "(client_state = None for a step that sends every client the global State)")
    if step.stage not in STAGES:
        raise ValueError(f"{where}: server step '{name}' declares stage {step.stage!r}, not one of {STAGES}")
    return step


@dataclass
class PlacedStep:
    step: ServerStep
    group: str  # its server-state group


class Pipeline:
    """The configured steps, grouped by stage, each with its server-state group."""

    def __init__(self, steps: Sequence[ServerStep]):
        self.placed = [PlacedStep(s, f"step.{i}.{s.name}") for i, s in enumerate(steps)]

    @classmethod
    def from_specs(cls, specs: Sequence[dict[str, Any]], where: str = "server_steps") -> "Pipeline":
        return cls([build_step(s, f"{where}[{i}]") for i, s in enumerate(specs)])

    def groups(self) -> list[str]:
        return [p.group for p in self.placed]

    def run(self, stage: str, value: Any, server_state: ServerState, ctx: RoundContext, metrics: dict[str, Any]) -> Any:
        """Run this stage's steps in config order; their new states go into ``server_state``
        (in place) and their metrics into ``metrics``."""
        for p in self.placed:
            if p.step.stage != stage:
                continue
            own: State = server_state.get(p.group, {})
            try:
                value, new_state, m = p.step(value, ctx, own)
            except KeyError as exc:  # a bare KeyError prints as the key alone: name the step
                rnd = getattr(ctx, "round", None)
                raise ValueError(f"server step '{p.step.name}' (stage {stage}{'' if rnd is None else f', round {rnd}'}) "
                                 f"found no entry {exc} in what it was given") from exc
            if new_state:
                server_state[p.group] = new_state
            for k, v in (m or {}).items():
                metrics[f"{p.step.name}.{k}"] = v
        return value

    def per_client(self, instructions: dict[int, Any], server_state: ServerState) -> dict[int, Any]:
        """Each instruction's State passed through the ``client_state`` hook of every step
        that has one, in config order (see the module docstring)."""
        for p in self.placed:
            hook = p.step.client_state
            if hook is None:
                continue
            own = server_state.get(p.group, {})
            instructions = {cid: replace(inst, state=hook(cid, inst.state, own)) for cid, inst in instructions.items()}
        return instructions
