"""FedAPT's client training (Su et al. 2024, "Federated Adaptive Prompt Tuning for
Multi-Domain Collaborative Learning", AAAI): the ``fedapt`` learner for the ``fedapt``
tuner (``peft/fedapt.py``).

Each client holds one domain ``d``, read from its profile (``federation.roles`` with
``profile: {domain: d}``; the ``by_domain`` partitioner gives client ``i`` domain ``i mod
D``). A local step trains the meta prompt, the adaptive network and the head on

    CE(logits with prompt + prompt * key_d, y) + domain_weight * CE(query(f(x)), d),

the two losses of the paper's code (weight 1 there). The server averages the prompt, the
adaptive network and the head (``aggregator.rule: fedavg``; the paper's code averages with
equal weights); the global model then picks each input's prompt from the keys with the
weights of its adaptive network (``peft/fedapt.py``). Not implemented: the paper's
unsupervised (pseudo-label) variant.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from fedfm.core.profile_keys import register_profile_key
from fedfm.core.types import Instruction, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.local import delta_update
from fedfm.learners.loop import train_loop
from fedfm.peft.state import set_state


class FedAPTLearnerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    domain_weight: float = Field(1.0, ge=0, description="weight of the adaptive network's domain cross-entropy")


def client_domain(ctx: LocalContext, num_domains: int) -> int:
    d = ctx.profile.get("domain")
    if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d < num_domains:
        raise ValueError(
            f"learner fedapt: client {ctx.cid} needs profile.domain, an integer in 0..{num_domains - 1} "
            f"(federation.roles with profile: {{domain: d}}); got {d!r}"
        )
    return d


class FedAPTObjective:
    """The task seen by ``train_loop``: the task's batches and loss plus the domain loss."""

    def __init__(self, task: Any, domain: int, weight: float):
        self.task, self.domain, self.weight = task, domain, weight

    def collate(self, examples, tokenizer):
        return self.task.collate(examples, tokenizer)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ce = self.task.loss(model, batch)
        scores = model.fedapt.last_scores  # (B, K), from this forward pass
        target = torch.full((scores.shape[0],), self.domain, dtype=torch.long, device=scores.device)
        return ce + self.weight * F.cross_entropy(scores.float(), target)


class FedAPTLearner:
    def __init__(self, params: FedAPTLearnerParams):
        self.params = params

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        module = getattr(ctx.model, "fedapt", None)
        if module is None:
            raise ValueError(f"learner 'fedapt' (client {ctx.cid}) needs peft.method: fedapt")
        domain = client_domain(ctx, module.keys.shape[0])
        set_state(ctx.model, instruction.state)
        module.domain = domain
        try:
            metrics = train_loop(replace(ctx, task=FedAPTObjective(ctx.task, domain, self.params.domain_weight)))
        finally:
            module.domain = None
        return delta_update(instruction, ctx, metrics)


def fedapt_config_problem(exp) -> str | None:
    """The fedapt learner needs the fedapt tuner and a domain for every role. (The tuner
    alone, under another learner, trains the adaptive network through the task loss only,
    with the key mix in place of the client's key: not FedAPT's training.)"""
    if exp.learner.name != "fedapt":
        return None
    if exp.peft.method != "fedapt":
        return f"learner fedapt needs peft.method fedapt (got '{exp.peft.method}')"
    k = dict(exp.peft.model_extra or {}).get("num_domains", 2)
    if not exp.federation.roles:
        return f"learner fedapt: every client needs profile.domain in 0..{k - 1}; give federation.roles with profile: {{domain: d}}"
    for role in exp.federation.roles:
        d = role.profile.get("domain")
        if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d < k:
            return f"learner fedapt: role '{role.name}' has profile.domain {d!r}, not an integer in 0..{k - 1} (peft.num_domains={k})"
    from fedfm.runtime.algorithm import client_profiles

    try:
        profiles = client_profiles(exp)
    except ValueError:
        return None  # the roles' own check reports it
    bare = sorted(cid for cid, profile in profiles.items() if "domain" not in profile)
    if bare:
        return (f"learner fedapt: client(s) {bare} are in no role of federation.roles and have no profile.domain; "
                f"every client needs one in 0..{k - 1} (the roles cover {exp.federation.clients - len(bare)} of "
                f"{exp.federation.clients} clients)")
    return None


register_learner("fedapt", FedAPTLearner, FedAPTLearnerParams)
register_profile_key("domain", "fedapt: the client's domain index, 0..peft.num_domains - 1", ("learner.name=fedapt",))
