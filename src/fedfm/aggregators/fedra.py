"""FedRA's server half (Su et al. 2023, "FedRA: A Random Allocation Strategy for Federated
Tuning to Unleash the Power of Heterogeneous Clients"): a random layer allocation per
round and per-layer aggregation over the clients that trained each layer.

Every round the server draws an allocation matrix ``M`` (clients x layers, 0/1): client k
gets ``l_k`` distinct layers drawn uniformly without replacement, ``l_k`` its tier's layer
count (``federation.roles[].profile.layers``, ``runtime/capacity.py``), among the model's
transformer layers, frozen ones included (the part is given the model by ``bind_model``:
with ``peft: {method: full, exclude: ["*layer.5.*"]}`` a 6-layer model still has 6 layers
to allocate, and a client given the frozen one runs it in its sub-model). Row k is drawn
from a generator seeded by ``derive_seed(seed, round, k, TAG)``, so it is the same in
every process and on a retry. The client receives its layers in
``Instruction.config["layers"]`` and, with the paper's sub-model (``learner.forward:
allocated``), the shared State of those layers and of the tensors outside every layer
(the task head) only, as the authors' server sends each client its sub-model
(``client_reference`` reads the layers from the instruction's config, so both ends agree
on the names); with ``forward: full`` the whole shared State (its forward pass runs every
layer). It trains the LoRA factors of its layers only (``learners/fedra.py``) and sends
those plus the tensors outside every layer. The server combines each layer over its
contributors only: the rule runs once per layer on the clients whose row of ``M`` has it,
with their weights; a layer no client trained gets a zero delta (it keeps its value under
a plain ``sgd`` server optimizer; one with momentum still moves it), and so does a
layer trained by fewer clients than the rule combines (Krum with f = 1 needs 4; noted under
``held_back`` in the round's row, ``aggregators/holders.py``).

The client trains the paper's sub-model, its allocated layers alone in their order
(``learner.forward: allocated``); ``forward: full`` keeps the unallocated layers in its
forward pass, frozen (FedRA-inspired). The simulated clock
(``sim_clock``) charges each tier its measured step cost over its profile ``speed``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedfm.aggregators.holders import combine_holders
from fedfm.aggregators.server_part import ServerPartBase, register_server_part
from fedfm.core.protocols import RoundContext
from fedfm.core.seeding import derive_seed
from fedfm.core.types import MODEL, ClientSpec, Instruction, ServerState, State, Update
from fedfm.peft.hetero import layer_of, layer_subset, num_layers
from fedfm.peft.layer_stack import stack_size
from fedfm.runtime.capacity import client_who, resolve_size

TAG = 0xFED7A


def allocation(seed: int, rnd: int, cid: int, count: int, total: int) -> list[int]:
    """The ``count`` layers (of ``total``) client ``cid`` trains in round ``rnd``, sorted."""
    if not 1 <= count <= total:
        raise ValueError(f"client {cid}: {count} trainable layers is outside 1..{total}")
    rng = np.random.default_rng(derive_seed(seed, rnd, cid, TAG))
    return sorted(int(i) for i in rng.choice(total, size=count, replace=False))


def allocation_matrix(seed: int, rnd: int, counts: dict[int, int], total: int) -> np.ndarray:
    """``M`` (clients x layers, rows in the order of ``counts``): M[i, l] = 1 if the i-th
    client trains layer l this round."""
    m = np.zeros((len(counts), total), dtype=np.int64)
    for i, (cid, n) in enumerate(counts.items()):
        m[i, allocation(seed, rnd, cid, n, total)] = 1
    return m


def per_layer_delta(model: State, payloads: Sequence[State], weights: Sequence[float], rule, rule_params,
                    notes: dict | None = None) -> tuple[State, dict[str, int]]:
    """(delta, contributors per group): each group of names (one per layer, and one for the
    names outside every layer) is combined by the rule over the payloads holding it; a layer
    held by fewer than the rule combines stays (``aggregators/holders.py``, noted as
    ``layer <i>``)."""
    groups: dict[str, list[str]] = {}
    for name in model:
        layer = layer_of(name)
        groups.setdefault("rest" if layer is None else str(layer), []).append(name)
    delta: State = {}
    counts: dict[str, int] = {}
    for key, names in groups.items():
        held = [i for i, p in enumerate(payloads) if names[0] in p]
        for i in held:
            if any(n not in payloads[i] for n in names):
                raise ValueError(f"a payload holds part of group '{key}' only")
        counts[key] = len(held)
        sub = {n: model[n] for n in names}
        delta.update(combine_holders(rule, rule_params, sub, [{n: payloads[i][n] for n in names} for i in held],
                                     [weights[i] for i in held], key if key == "rest" else f"layer {key}", notes))
    return delta, counts


def layer_count(shared: State) -> int:
    """The shared State's layer count; refused when no name carries a layer index (a soft
    prompt, a head only: nothing to allocate)."""
    total = num_layers(shared)
    if total == 0:
        raise ValueError("learner fedra: no trainable State name carries a layer index ('.layer.<i>.'): nothing to "
                         "allocate; use a tuner inside the layers (lora, adapter, ia3, bitfit, full), not a soft prompt")
    return total


class FedRAServer(ServerPartBase):
    def __init__(self, params, num_clients: int):
        self.num_clients = num_clients
        self.layers: int | None = None  # the model's transformer layers (bind_model); None: the State's
        self.last_counts: dict[str, int] = {}
        # the paper's sub-model: a client is sent its allocated layers (and the tensors outside every layer) only
        self.sub_model = params is None or params.forward == "allocated"

    def bind_model(self, model) -> None:
        try:
            self.layers = stack_size(model, "learner fedra")
        except ValueError:  # no layer stack: the trainable State's layers (forward: full)
            self.layers = None

    def total(self, shared: State) -> int:
        """The layers allocated among: the model's, else the trainable State's."""
        count = layer_count(shared)
        return count if self.layers is None else max(self.layers, count)

    def init(self, model: State) -> ServerState:
        layer_count(model)
        return {}

    def instruction(self, rnd: int, server_state: ServerState, client: ClientSpec, seed: int) -> Instruction:
        model = server_state[MODEL]
        total = self.total(model)
        count = resolve_size(client.profile, "layers", total, client_who(client.cid, client.profile))
        layers = allocation(seed, rnd, client.cid, count, total)
        state = layer_subset(model, layers) if self.sub_model else model
        return Instruction(round=rnd, cid=client.cid, state=state, config={"layers": layers})

    def client_reference(self, cid: int, profile: dict, shared: State, config: dict | None = None) -> State:
        # the client's layer count against the model's, here too: fedfm check and the start
        # of a run ask every client's reference, so a count past the model is refused before training
        resolve_size(profile, "layers", self.total(shared), client_who(cid, profile))
        if self.sub_model and config is not None:
            return layer_subset(shared, [int(i) for i in config["layers"]])
        return shared

    def client_payload_spec(self, instruction: Instruction, shared: State) -> State:
        return layer_subset(shared, instruction.config["layers"])

    def combine_updates(self, server_state: ServerState, updates: Sequence[Update], rule, rule_params, ctx: RoundContext):
        model = server_state[MODEL]
        delta, self.last_counts = per_layer_delta(model, [u.payload for u in updates], [float(u.num_examples) for u in updates],
                                                  rule, rule_params, ctx.notes if ctx is not None else None)
        return {}, delta


register_server_part("fedra", FedRAServer)

__all__ = ["FedRAServer", "allocation", "allocation_matrix", "per_layer_delta"]
