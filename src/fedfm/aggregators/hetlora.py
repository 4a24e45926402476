"""HetLoRA's server half (Cho et al. 2024, "Heterogeneous LoRA for Federated Fine-tuning
of On-Device Foundation Models"): zero-padding aggregation and truncation.

The global LoRA factors have the largest rank ``r_max`` (``peft.r``). Each client k gets
them truncated to its tier's rank ``r_k`` (``federation.roles[].profile.rank``, see
``runtime/capacity.py``): ``A[:r_k, :]``, ``B[:, :r_k]``. It returns its trained factors
(as a delta against what it received); the server zero-pads every client's factors to
``r_max`` and averages them, module by module:

    A <- sum_k p_k pad(A_k),   B <- sum_k p_k pad(B_k)

with ``p_k`` proportional to ``||B_k A_k||_F`` (the paper's sparsity-weighted aggregation,
``weighting: sparsity``; examples when every norm is zero) or to the client's examples
(``weighting: examples``). The padded modules are handed to the configured rule as deltas
against the global factors (``fedavg`` gives the weighted mean above exactly), so the
server optimizer then applies the result. Other trainable tensors (the task head) are
aggregated by the rule with example weights.

Rank self-pruning (``learner.prune``, client half in ``learners/hetrank.py``): a client
that pruned reports ``hetlora_rank``; the server keeps each client's current rank in the
server-state group ``hetlora.rank`` (0 = its tier's rank) and from then on sends it only
that many non-zero components. The wire shape stays the tier's rank (the pruned
components travel as zeros): the client decodes its broadcast against shapes it computes
from its profile before it reads the instruction's config, so a pruned rank cannot shrink
the downlink without the round loop passing the config to ``down_reference``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedfm.aggregators.server_part import ServerPartBase, register_server_part
from fedfm.core.protocols import RoundContext
from fedfm.core.types import MODEL, ClientSpec, Instruction, ServerState, State, Update
from fedfm.peft.hetero import lora_pairs, lora_rank, pad, products, truncate
from fedfm.runtime.capacity import client_who, resolve_size

GROUP = "hetlora.rank"


def tier_rank(profile: dict, shared: State, cid: int) -> int:
    """A client's rank from its profile, on a model of rank ``lora_rank(shared)``."""
    full = lora_rank(shared)
    if full == 0:
        raise ValueError("HetLoRA/FlexLoRA need peft.method lora: the shared State has no LoRA factors")
    return resolve_size(profile, "rank", full, client_who(cid, profile))


def module_weights(modules: Sequence[State], examples: Sequence[float], weighting: str) -> dict[str, list[float]]:
    """module -> one weight per client: ``||B_k A_k||_F`` (sparsity) or examples."""
    pairs = lora_pairs(modules[0])
    if weighting == "examples":
        return {m: list(examples) for m in pairs}
    norms = [products(mod) for mod in modules]
    out = {}
    for m in pairs:
        w = [float(torch.linalg.matrix_norm(p[m])) for p in norms]
        out[m] = w if sum(w) > 0 else list(examples)
    return out


def zero_pad_delta(model: State, modules: Sequence[State], examples: Sequence[float], weighting: str, rule, rule_params) -> State:
    """The rule's combination of the clients' zero-padded factors, as a delta on ``model``.

    ``modules``: each client's trained State at its own rank (factors of any rank <=
    ``r_max``; other tensors as in ``model``)."""
    r_max = lora_rank(model)
    padded = [pad(m, r_max) for m in modules]
    delta: State = {}
    for m, w in module_weights(padded, examples, weighting).items():
        a, b = lora_pairs(model)[m]
        sub = {a: model[a], b: model[b]}
        delta.update(rule(sub, [{k: p[k] - model[k] for k in sub} for p in padded], w, rule_params))
    rest = {k: v for k, v in model.items() if k not in delta}
    if rest:
        delta.update(rule(rest, [{k: p[k] - model[k] for k in rest} for p in padded], list(examples), rule_params))
    return delta


class HetLoraServer(ServerPartBase):
    def __init__(self, params, num_clients: int):
        self.weighting = params.weighting
        self.num_clients = num_clients

    def init(self, model: State) -> ServerState:
        return {GROUP: {"rank": torch.zeros(self.num_clients)}}

    def effective_rank(self, server_state: ServerState, profile: dict, cid: int) -> tuple[int, int]:
        """(the tier's rank, the rank the client trains now: lower once it pruned)."""
        tier = tier_rank(profile, server_state[MODEL], cid)
        stored = int(server_state[GROUP]["rank"][cid]) if GROUP in server_state else 0
        return tier, (min(tier, stored) if stored > 0 else tier)

    def issued(self, server_state: ServerState, profile: dict, cid: int) -> tuple[State, int]:
        tier, rank = self.effective_rank(server_state, profile, cid)
        return pad(truncate(server_state[MODEL], rank), tier), rank

    def instruction(self, rnd: int, server_state: ServerState, client: ClientSpec, seed: int) -> Instruction:
        state, rank = self.issued(server_state, client.profile, client.cid)
        return Instruction(round=rnd, cid=client.cid, state=state, config={"rank": rank})

    def client_reference(self, cid: int, profile: dict, shared: State, config: dict | None = None) -> State:
        return truncate(shared, tier_rank(profile, shared, cid))

    def client_payload_spec(self, instruction: Instruction, shared: State) -> State:
        return {k: instruction.state[k] for k in shared}

    def combine_updates(self, server_state: ServerState, updates: Sequence[Update], rule, rule_params, ctx: RoundContext):
        profiles = {c.cid: c.profile for c in ctx.clients}
        model = server_state[MODEL]
        modules = []
        ranks = server_state[GROUP]["rank"].clone() if GROUP in server_state else torch.zeros(self.num_clients)
        for u in updates:
            sent, _ = self.issued(server_state, profiles.get(u.cid, {}), u.cid)
            modules.append({k: sent[k] + u.payload[k].to(sent[k].dtype) for k in sent})
            if "hetlora_rank" in u.metrics:
                ranks[u.cid] = float(u.metrics["hetlora_rank"])
        delta = zero_pad_delta(model, modules, [float(u.num_examples) for u in updates], self.weighting, rule, rule_params)
        return {GROUP: {"rank": ranks}}, delta


register_server_part("hetlora", HetLoraServer)

__all__ = ["GROUP", "HetLoraServer", "module_weights", "tier_rank", "zero_pad_delta"]
