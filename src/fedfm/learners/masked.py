"""Training a pruned model on a client: the part PruneFL and FLASH share.

The instruction carries the shared State and, in the broadcast group ``group``, one packed
mask per prunable weight (``peft/pruning.py``). ``train_masked`` multiplies each prunable
weight by its mask (pruned entries are exactly zero), trains with the gradients of pruned
entries zeroed after every backward pass (so they stay zero under SGD and AdamW: a zero
gradient gives a zero step, and weight decay keeps a zero at zero) and returns the delta
against the masked weights it received: zero at every pruned entry.

``on_gradients(step, params, masks)``, when given, runs after each backward pass before
the masking, with the dense gradients of every prunable weight (a pruned entry has one:
the weight is a dense tensor whose zeros are values): PruneFL sums their squares, FLASH's
discovery round prunes and regrows the masks in place there.

``pruning_config_problems``: both learners prune the model's own weights, so
``peft.method`` must be ``full`` (which makes them the State), and the server step must be
plain FedAvg (``server_optimizer: {name: sgd, lr: 1.0}``): their servers zero a removed
entry through the delta, exact only when the step adds the delta as it is. PruneFL's
``reconfigure_until`` must be below ``rounds`` (the last round's new masks would train
nowhere); FLASH needs ``rounds >= 2`` (its first aggregated round discovers). A role's profile ``capacity``
or ``density`` is refused with PruneFL: only FLASH reads them for pruning (Hetero-FLASH),
and no other part of a PruneFL run reads them (rank, layers and cut come from them for
HetLoRA, FedRA and split learning only).
"""

from __future__ import annotations

from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators.nested_masks import client_share
from fedfm.aggregators.server_opt import not_as_is
from fedfm.core.types import Instruction
from fedfm.learners.base import LocalContext
from fedfm.learners.loop import train_loop
from fedfm.peft.pruning import unpack_mask
from fedfm.peft.state import get_state, set_state


class PrunableParams(BaseModel):
    """The parameter both pruning learners take: which weights may be pruned."""

    model_config = ConfigDict(extra="forbid")
    prune: list[str] = Field(default_factory=lambda: ["*"], min_length=1,
                             description="fnmatch patterns of the State's 2-D weights that may be pruned (task heads never are)")


GradientHook = Callable[[int, dict[str, torch.nn.Parameter], dict[str, torch.Tensor]], None]


def received_masks(instruction: Instruction, ctx: LocalContext, group: str) -> dict[str, torch.Tensor]:
    """The masks of ``group`` unpacked to the model's weights (bool, on their device)."""
    packed = instruction.broadcast.get(group)
    if not packed:
        raise ValueError(f"client {ctx.cid}: the instruction carries no masks ('{group}')")
    params = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}
    masks = {}
    for name, bits in packed.items():
        if name not in params:
            raise ValueError(f"client {ctx.cid} received a mask for '{name}', which is not a trainable weight")
        masks[name] = unpack_mask(bits, params[name]).to(params[name].device)
    return masks


def train_masked(instruction: Instruction, ctx: LocalContext, masks: dict[str, torch.Tensor],
                 on_gradients: GradientHook | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(delta against the masked received State, the loop's metrics); ``masks`` may be
    changed in place by ``on_gradients``."""
    set_state(ctx.model, instruction.state)
    params = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, m in masks.items():
            params[name].mul_(m)
    start = get_state(ctx.model)
    prunable = {n: params[n] for n in masks}
    step = [0]

    def after_backward() -> None:
        if on_gradients is not None:
            on_gradients(step[0], prunable, masks)
        for name, m in masks.items():
            if params[name].grad is not None:
                params[name].grad.mul_(m)
        step[0] += 1

    metrics = train_loop(ctx, after_backward=after_backward)
    trained = get_state(ctx.model)
    return {k: trained[k] - start[k] for k in trained}, metrics


PRUNING_LEARNERS = ("prunefl", "flash")


def pruning_config_problems(exp) -> list[str]:
    name = exp.learner.name
    if name not in PRUNING_LEARNERS:
        return []
    problems = []
    got = not_as_is(exp.server_optimizer)
    if got is not None:
        problems.append(f"learner {name}: server_optimizer must be {{name: sgd, lr: 1.0}} (got {got}): "
                        "the server averages, and zeroes a removed entry through the delta, exact only when "
                        "the server adds the delta as it is")
    if exp.peft.method != "full":
        problems.append(f"learner {name} prunes the model's own weights: peft.method must be full (got {exp.peft.method})")
    given = exp.learner.params()
    until = given.get("reconfigure_until")
    if name == "prunefl" and isinstance(until, int) and until >= exp.rounds:
        problems.append(f"learner.reconfigure_until: {until} with rounds {exp.rounds}: round {exp.rounds}'s squared gradients "
                        "would be sent for masks no round trains; set it below rounds")
    if name == "flash" and exp.rounds < 2:
        problems.append(f"learner flash: rounds {exp.rounds}: round 1 is the discovery round, which trains nothing it keeps; "
                        "give rounds >= 2")
    if name == "flash":
        problems += _share_problems(exp, given) + _schedule_problems(exp, given)
    if name == "prunefl":
        for role in exp.federation.roles:
            keys = [k for k in ("capacity", "density") if k in role.profile]
            if keys:
                them = "them" if len(keys) > 1 else "it"
                problems.append(f"federation.roles '{role.name}': profile {' and '.join(keys)} with learner prunefl, which "
                                f"ignores {them}: only FLASH (learner: flash) reads capacity and density for pruning; "
                                f"remove {them}, or use learner flash")
    return problems


def _schedule_problems(exp, given: dict) -> list[str]:
    """FLASH's settings that would be capped or ignored: more discovery updates than local
    steps (updates come after distinct steps), ``update_every`` without JMWST."""
    problems = []
    updates, steps = given.get("updates", 1), exp.train.steps
    if steps is not None and updates > steps:
        problems.append(f"learner.updates: {updates} with train.steps {steps}: a discovery round updates the mask after "
                        f"distinct local steps, at most {steps}; set learner.updates to at most {steps}")
    if given.get("update_every", 1) != 1 and given.get("variant", "spdst") != "jmwst":
        problems.append(f"learner.update_every: {given['update_every']} acts with variant jmwst only (the SPDST mask stays "
                        "fixed after discovery); remove it, or set learner.variant: jmwst")
    return problems


def _share_problems(exp, given: dict) -> list[str]:
    """Hetero-FLASH: each role's profile density/capacity valid; with JMWST, rule fedavg."""
    from fedfm.learners.flash import FlashParams  # imports this module

    target = given.get("density", FlashParams.model_fields["density"].default)
    problems, below = [], []
    for role in exp.federation.roles:
        try:
            if client_share(role.profile, target, f"federation.roles '{role.name}'") < 1.0:
                below.append(role.name)
        except ValueError as e:
            problems.append(str(e))
    if below and given.get("variant") == "jmwst" and exp.aggregator.rule != "fedavg":
        problems.append(f"learner flash: roles {below} train below learner.density (profile density/capacity) with "
                        f"variant jmwst: each entry is averaged over the clients whose mask keeps it, so "
                        f"aggregator.rule must be fedavg (got {exp.aggregator.rule})")
    return problems
