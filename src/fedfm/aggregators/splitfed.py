"""The server side of SplitFed over exchange phases (learner and exchange ``splitfed``).

SplitFed-V1 (Thapa et al. 2022, "SplitFed: When Federated Learning Meets Split
Learning", AAAI; Algorithm 1, with label sharing): the *fed server* sends every client
the client-side part of the global model at the start of the round and averages the
client-side parts at its end; the *main server* keeps one copy of the server-side part
per client, answers each of that client's steps (forward of the received activations,
loss with the received labels, backward, optimizer step on its copy, the activations'
gradient back) and averages its copies at the end of the round. Here both averages are
the round's aggregation rule over the clients' full-model deltas (client-side delta from
the client, server-side delta from the client's server copy), weighted by example count.
Several cut points by capacity (FedSplitX-inspired, Shin et al. 2023: several cut points;
no auxiliary networks) come from the profile's ``cut`` (or ``capacity``), counted against
the model's transformer layers as learner ``split`` counts them, frozen layers included
(the part is given the model by ``bind_model``): each client's delta covers the whole
model whatever its cut, so averaging over every name is well defined.

``SplitFedServer`` is the server part (``aggregators/server_part.py``): each client's
train instruction carries only the client-side weights at its cut (so the downlink of the
round is exactly the client-side model), and the train reply is empty (the client-side
delta comes back in the last exchange phase; ``learners/splitfed.py``).

The main server's per-client copies and their steps are in ``learners/splitfed_server.py``.
"""

from __future__ import annotations

from fedfm.aggregators.server_part import ServerPartBase, register_server_part
from fedfm.core.types import MODEL, ClientSpec, Instruction, ServerState, State
from fedfm.peft.hetero import layer_of, num_layers
from fedfm.peft.layer_stack import stack_size
from fedfm.runtime.capacity import client_who, resolve_size


def client_side(name: str, cut: int) -> bool:
    """Whether a trainable tensor lives on the client: embeddings and layers < cut."""
    layer = layer_of(name)
    return ".embeddings." in name or (layer is not None and layer < cut)


def cut_of(profile: dict, layers: int, cid: int) -> int:
    """Client ``cid``'s cut: its profile's ``cut`` (or ``capacity``) against the model's
    ``layers`` transformer layers, frozen ones included, as learner ``split`` counts them
    (no key: every layer; the server keeps the head)."""
    return resolve_size(profile, "cut", layers, client_who(cid, profile))


def client_names(model: State, cut: int) -> list[str]:
    return [n for n in model if client_side(n, cut)]


def server_names(model: State, cut: int) -> list[str]:
    return [n for n in model if not client_side(n, cut)]


class SplitFedServer(ServerPartBase):
    """Server part of learner ``splitfed``: per-client instructions of the client half."""

    def __init__(self, params, num_clients: int):
        self.num_clients = num_clients
        self.layers: int | None = None  # the model's transformer layers (bind_model)

    def bind_model(self, model) -> None:
        self.layers = stack_size(model, "learner splitfed")

    def cut(self, profile: dict, cid: int) -> int:
        if self.layers is None:
            raise RuntimeError("splitfed: the server part counts its cut against the model: call bind_model(model) first")
        return cut_of(profile, self.layers, cid)

    def init(self, model: State) -> ServerState:
        if num_layers(model) == 0:
            raise ValueError("splitfed: no trainable State name carries a layer index ('.layer.<i>.'): nowhere to cut")
        return {}

    def payload_spec(self, shared: State) -> State:
        return {}

    def instruction(self, rnd: int, server_state: ServerState, client: ClientSpec, seed: int) -> Instruction:
        model = server_state[MODEL]
        cut = self.cut(client.profile, client.cid)
        state = {n: model[n] for n in client_names(model, cut)}
        return Instruction(round=rnd, cid=client.cid, state=state, config={"cut": cut})

    def client_reference(self, cid: int, profile: dict, shared: State, config: dict | None = None) -> State:
        cut = self.cut(profile, cid)
        return {n: shared[n] for n in client_names(shared, cut)}

    def client_payload_spec(self, instruction: Instruction, shared: State) -> State:
        return {}  # the train reply is empty: the client-side delta comes in the last phase


register_server_part("splitfed", SplitFedServer)


__all__ = ["SplitFedServer", "client_names", "client_side", "cut_of", "server_names"]
