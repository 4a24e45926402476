"""FlexLoRA's server half (Bai et al. 2024, "Federated Fine-tuning of Large Language
Models under Heterogeneous Tasks and Client Resources"): aggregate full-size updates,
redistribute by truncated SVD.

Client k trains LoRA at its tier's rank ``r_k`` (``learners/hetrank.py``) and returns its
factors as a delta against what it received. The server rebuilds each client's full-size
update ``dW_k = B_k A_k`` (``(out, in)``, per LoRA module), combines them with the rule as
deltas against the global ``dW = B A`` (``fedavg``: ``dW <- sum_k p_k dW_k`` with ``p_k``
proportional to examples, the paper's weighting), and factors the result by SVD,
``dW = U S V^T``: the global factors become ``B = U_r S_r``, ``A = V_r^T`` at
``r = r_max`` (``peft.r``). Because the singular values are sorted, truncating those
factors to ``r_k`` is the rank-``r_k`` SVD truncation of ``dW`` (Eckart-Young's best
rank-``r_k`` approximation): that is what client k receives next. At full rank
(``r >= rank(dW)``) ``B A`` reproduces ``dW`` exactly.

The global model is the rank-``r_max`` truncation of the aggregated ``dW`` (the one base
model holds LoRA at ``r_max``); the components beyond ``r_max`` are dropped. Other
trainable tensors (the task head) are aggregated by the rule with example weights. The
new factors replace the old ones, so the server optimizer must be ``sgd`` with ``lr``
1.0 (refused otherwise at config time): a step of a different size between two SVD
factorizations has no meaning. The LoRA scaling ``alpha / r_max`` is common to every
client and cancels.
"""

from __future__ import annotations

from typing import Sequence

from fedfm.aggregators.hetlora import tier_rank
from fedfm.aggregators.server_part import ServerPartBase, register_server_part
from fedfm.core.protocols import RoundContext
from fedfm.core.types import MODEL, ClientSpec, Instruction, ServerState, State, Update
from fedfm.peft.hetero import lora_pairs, lora_rank, products, svd_factors, truncate


def redistribute(dw: State, model: State, rank: int) -> State:
    """Factors of rank ``rank`` for every module of ``dw`` (module -> ``(out, in)``),
    named and typed as the LoRA factors of ``model``."""
    out: State = {}
    for m, (a, b) in lora_pairs(model).items():
        fb, fa = svd_factors(dw[m], rank)
        out[a], out[b] = fa.to(model[a].dtype), fb.to(model[b].dtype)
    return out


def flexlora_delta(model: State, trained: Sequence[State], examples: Sequence[float], rule, rule_params) -> State:
    """The delta on ``model`` that makes its factors the rank-``r_max`` SVD of the rule's
    combination of the clients' ``B_k A_k`` (other tensors: the rule over their deltas)."""
    dw = products(model)
    dws = [products(t) for t in trained]
    d = rule(dw, [{m: p[m] - dw[m] for m in dw} for p in dws], list(examples), rule_params)
    factors = redistribute({m: dw[m] + d[m] for m in dw}, model, lora_rank(model))
    delta = {k: factors[k] - model[k] for k in factors}
    rest = {k: v for k, v in model.items() if k not in factors}
    if rest:
        delta.update(rule(rest, [{k: t[k] - model[k] for k in rest} for t in trained], list(examples), rule_params))
    return delta


class FlexLoraServer(ServerPartBase):
    def __init__(self, params, num_clients: int):
        self.num_clients = num_clients

    def instruction(self, rnd: int, server_state: ServerState, client: ClientSpec, seed: int) -> Instruction:
        rank = tier_rank(client.profile, server_state[MODEL], client.cid)
        return Instruction(round=rnd, cid=client.cid, state=truncate(server_state[MODEL], rank), config={"rank": rank})

    def client_reference(self, cid: int, profile: dict, shared: State, config: dict | None = None) -> State:
        return truncate(shared, tier_rank(profile, shared, cid))

    def client_payload_spec(self, instruction: Instruction, shared: State) -> State:
        return {k: instruction.state[k] for k in shared}

    def combine_updates(self, server_state: ServerState, updates: Sequence[Update], rule, rule_params, ctx: RoundContext):
        model = server_state[MODEL]
        trained = []
        for u in updates:
            sent = truncate(model, lora_rank(u.payload))
            trained.append({k: sent[k] + u.payload[k].to(sent[k].dtype) for k in sent})
        return {}, flexlora_delta(model, trained, [float(u.num_examples) for u in updates], rule, rule_params)


register_server_part("flexlora", FlexLoraServer)

__all__ = ["FlexLoraServer", "flexlora_delta", "redistribute"]
