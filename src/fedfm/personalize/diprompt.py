"""DiPrompT-inspired client training and per-domain aggregation (Bai, Zhang, Li, Guo, Guo,
Hou, Han and Lu 2024, "DiPrompT: Disentangled Prompt Tuning for Multiple Latent Domain
Generalization in Federated Learning", CVPR): the ``diprompt`` learner and its server half,
for the ``diprompt`` tuner (``peft/diprompt.py``).

Client (``learner: {name: diprompt, query, assign}``). No client is told its domain:

- ``assign: sample`` (the paper: a domain per sample): every local step queries the batch
  under the current domain prompts (``query_scores``, no gradient, eval mode) and assigns
  each input to its best domain prompt, so the choice follows the prompts as they train;
- ``assign: client``: one query at the start of the round over up to ``assign_examples``
  training examples (the highest mean score); the whole round trains that prompt.

The step's loss is ``CE(f(x; G), y) + CE(f(x; D_{a(x)}), y)``: the global prompt, the
assigned domain prompts and the head get gradients; a domain prompt no input was assigned
to gets none and its delta is exactly zero. The update's metadata carries
``diprompt.counts``: per domain prompt, the inputs trained under it (summed over steps).

Server (``combine_updates``): the global prompt and the head by the aggregation rule over
every update, weighted by ``num_examples``; domain prompt m by the rule over the updates
whose count for m is positive only, weighted by those counts (a prompt no client trained
keeps its value), as FedRA's per-layer aggregation counts only the clients that trained a
layer. ``domain_momentum`` (beta) moves a domain prompt by ``(1 - beta)`` of that mean:
``D <- beta D + (1 - beta) (D + mean delta)``, the paper's moving-average update of the
D-Prompts against client drift (beta 0: the plain mean).

Client-level DP (``dp_clip``, ``dp_noise``, ``dp_client_noise``) is refused at config
time (``checks.diprompt_dp_problems``): it bounds a client's influence on the mean of n
equally weighted clipped updates by C / n, but a domain prompt is averaged with the
clients' own input counts over the clients that trained it only, so the one client that
trained a prompt moves it by up to C (n = 4, C = 0.5: 0.5 against the 0.125 the noise is
sized for).

Bytes: the payload names every domain prompt (the server checks names and shapes), the
untouched ones as exact zeros; the lossless uplink stage ``{skip_zero: true}``
(``codecs/skip_zero.py``) drops those, so the uplink counts the global prompt, the head
and the domain prompts the client trained only.

Not implemented (hence "DiPrompT-inspired"): the paper's Q-Prompt and its two-substep
image-text alignment (the query here is the domain prompts' own confidence or loss), CLIP
and images; the disentanglement is by construction (a prompt shared by all against
prompts trained on their domain's inputs only), with no extra loss.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators.holders import combine_holders
from fedfm.aggregators.server_part import ServerPartBase, register_server_part
from fedfm.core.protocols import RoundContext
from fedfm.core.types import MODEL, ServerState, State, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.local import delta_update
from fedfm.learners.loop import train_loop
from fedfm.peft.diprompt import assign_domains, query_scores
from fedfm.peft.state import set_state

COUNTS = "diprompt.counts"
DOMAIN_NAME = re.compile(r"(?:^|\.)diprompt\.domains\.(\d+)$")


class DiPromptLearnerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: Literal["confidence", "loss"] = Field("confidence", description="confidence: max class probability (label-free); loss: lowest CE")
    assign: Literal["sample", "client"] = Field("sample", description="sample: each input every step; client: one prompt per client and round")
    assign_examples: int = Field(64, ge=1, description="training examples queried for assign: client")
    domain_momentum: float = Field(0.0, ge=0, lt=1, description="beta of the server's moving average of each domain prompt")


def module_of(ctx: LocalContext):
    module = getattr(ctx.model, "diprompt", None)
    if module is None:
        raise ValueError(f"learner 'diprompt' (client {ctx.cid}) needs peft.method: diprompt")
    return module


def query(module, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """(B, M) query scores of a batch under the current domain prompts (no gradient; the
    caller puts the model in eval mode)."""
    with torch.no_grad():
        logits = module.each_prompt(batch["input_ids"], batch.get("attention_mask"), module.domain_stack())
    return query_scores(logits, batch["labels"] if kind == "loss" else None)


class DiPromptObjective:
    """The task seen by ``train_loop``: CE under the global prompt + CE under each input's domain prompt."""

    def __init__(self, task: Any, model: torch.nn.Module, kind: str, fixed: int | None):
        self.task, self.model, self.kind, self.fixed = task, model, kind, fixed
        self.counts = [0] * len(model.diprompt.domains)

    def collate(self, examples, tokenizer):
        return self.task.collate(examples, tokenizer)

    def assign(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.fixed is not None:
            return torch.full((batch["input_ids"].shape[0],), self.fixed, dtype=torch.long)
        was = self.model.training
        self.model.eval()
        try:
            return assign_domains(query(self.model.diprompt, batch, self.kind))
        finally:
            self.model.train(was)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        module = self.model.diprompt
        a = self.assign(batch)  # (B,)
        for m in a.tolist():
            self.counts[m] += 1
        b = a.shape[0]
        # only the assigned domain prompts enter the graph: the others get no gradient
        prompts = torch.cat([module.global_prompt.unsqueeze(0).expand(b, -1, -1), torch.stack([module.domains[m] for m in a.tolist()])])
        mask = batch.get("attention_mask")
        logits = module.run(batch["input_ids"].repeat(2, 1), None if mask is None else mask.repeat(2, 1), prompts)  # (2B, C)
        y = batch["labels"]
        return F.cross_entropy(logits[:b].float(), y) + F.cross_entropy(logits[b:].float(), y)


def client_choice(ctx: LocalContext, kind: str, limit: int) -> int:
    """assign: client: the domain prompt with the highest mean score over the first examples."""
    items = ctx.examples[:limit]
    bs = ctx.train.batch_size
    ctx.model.eval()
    total = None
    for i in range(0, len(items), bs):
        s = query(ctx.model.diprompt, ctx.task.collate(items[i : i + bs], ctx.tokenizer), kind).sum(0)  # (M,)
        total = s if total is None else total + s
    return int(assign_domains(total.unsqueeze(0))[0])


class DiPromptLearner:
    def __init__(self, params: DiPromptLearnerParams):
        self.p = params

    def local_update(self, instruction, ctx: LocalContext) -> Update:
        module_of(ctx)
        set_state(ctx.model, instruction.state)
        fixed = client_choice(ctx, self.p.query, self.p.assign_examples) if self.p.assign == "client" else None
        objective = DiPromptObjective(ctx.task, ctx.model, self.p.query, fixed)
        metrics = train_loop(replace(ctx, task=objective))
        update = delta_update(instruction, ctx, metrics)
        update.meta = {**update.meta, COUNTS: json.dumps(objective.counts)}
        update.metrics = {**update.metrics, **{f"domain_inputs.{m}": float(n) for m, n in enumerate(objective.counts)}}
        return update


def domain_names(model: State) -> dict[int, str]:
    """Domain index -> State name of that domain prompt."""
    out = {}
    for name in model:
        hit = DOMAIN_NAME.search(name)
        if hit:
            out[int(hit.group(1))] = name
    return dict(sorted(out.items()))


def counts_of(update: Update, m: int) -> list[float]:
    raw = update.meta.get(COUNTS)
    try:
        counts = [float(x) for x in json.loads(raw)]
    except (TypeError, ValueError):
        raise ValueError(f"diprompt: the update of client {update.cid} has no valid {COUNTS} (got {raw!r})") from None
    if len(counts) != m or any(c < 0 for c in counts):
        raise ValueError(f"diprompt: client {update.cid} sent {COUNTS} {counts}; expected {m} counts >= 0")
    return counts


def per_domain_delta(model: State, updates: Sequence[Update], rule, rule_params, momentum: float = 0.0,
                     notes: dict | None = None) -> tuple[State, list[int]]:
    """(delta, contributors per domain): the shared names by the rule over every update
    (weights num_examples), each domain prompt over the updates that trained it (weights
    their counts), scaled by ``1 - momentum``; a prompt nobody trained, or trained by fewer
    clients than the rule combines: zero delta (``aggregators/holders.py``)."""
    domains = domain_names(model)
    counts = [counts_of(u, len(domains)) for u in updates]
    shared = [n for n in model if n not in set(domains.values())]
    delta = dict(rule({n: model[n] for n in shared}, [{n: u.payload[n] for n in shared} for u in updates],
                      [float(u.num_examples) for u in updates], rule_params)) if shared else {}
    contributors = []
    for m, name in domains.items():
        held = [i for i, c in enumerate(counts) if c[m] > 0]
        contributors.append(len(held))
        mean = combine_holders(rule, rule_params, {name: model[name]}, [{name: updates[i].payload[name]} for i in held],
                               [counts[i][m] for i in held], f"domain {m}", notes)[name]
        delta[name] = (1 - momentum) * mean
    return delta, contributors


class DiPromptServer(ServerPartBase):
    def __init__(self, params: DiPromptLearnerParams, num_clients: int):
        self.p = params
        self.last_contributors: list[int] = []

    def init(self, model: State) -> ServerState:
        if not domain_names(model):
            raise ValueError("learner diprompt: the shared State has no domain prompt 'diprompt.domains.<m>' (peft.method diprompt, not in peft.local)")
        return {}

    def combine_updates(self, server_state: ServerState, updates: Sequence[Update], rule, rule_params, ctx: RoundContext):
        delta, self.last_contributors = per_domain_delta(server_state[MODEL], updates, rule, rule_params, self.p.domain_momentum,
                                                         ctx.notes if ctx is not None else None)
        return {}, delta


def diprompt_config_problem(exp) -> str | None:
    """The learner and the tuner only work together; the tuner's forward pass is the
    ensemble, which another learner would train as one model (not DiPrompT's training)."""
    learner, method = exp.learner.name == "diprompt", exp.peft.method == "diprompt"
    if learner and not method:
        return f"learner diprompt needs peft.method diprompt (got '{exp.peft.method}')"
    if method and not learner:
        return f"peft.method diprompt needs learner diprompt (got '{exp.learner.name}'): another learner would train the ensemble output"
    if not learner:
        return None
    m = dict(exp.peft.model_extra or {}).get("num_domains", 2)
    if isinstance(m, int) and m < 1:
        return f"peft.num_domains={m}: DiPrompT needs at least 1 domain prompt"
    if any(p.startswith("diprompt") or p.startswith("*diprompt") for p in exp.peft.local):
        return f"peft.local {list(exp.peft.local)}: the diprompt prompts are shared by construction (the server aggregates them per domain)"
    return None


register_learner("diprompt", DiPromptLearner, DiPromptLearnerParams)
register_server_part("diprompt", DiPromptServer)

__all__ = ["DiPromptLearnerParams", "per_domain_delta", "domain_names"]
