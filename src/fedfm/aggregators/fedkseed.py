"""FedKSeed's server half (Qin et al. 2024, "Federated Full-Parameter Tuning of
Billion-Sized Language Models with Communication Cost under 18 Kilobytes", Algorithm 1).

Clients send (seed index, projected-gradient scalar) pairs: the declared payload is
``seeds`` int64 (steps,) and ``grads`` float32 (steps,). The server turns one round's
pairs into a row of per-seed coefficients

    c_r[k] = -lr * sum_i w_i * sum_{j: s_ij = k} g_ij,      w_i = n_i / sum_S n,

appends it to the history (server-state group ``fedkseed.history``, entry ``coef``,
(rounds, K) float32, checkpointed with the rest of the server state) and returns
``D(c_r) = sum_k c_r[k] z(pool_k)`` as the pseudo-gradient, which the server optimizer
``sgd`` at lr 1.0 adds to the model (``aggregators/zo_replay.py``): the server's model is
the replay of its history from the base model, bit for bit (on any x86 CPU; see
``zo_replay``). The payloads reach this half
through the ``non_state_payload`` step (``aggregators/zo_payload.py``), which also carries
each client's example count.

With ``seed_sampling: score`` (FedKSeed-Pro, ``aggregators/fedkseed_pro.py``) the group
also holds each seed's amplitude statistics ``amp`` and ``count``, from which the server
draws the clients' seeds.

The server sends no State (``sends_state = False``) and broadcasts nothing beside it: a
client gets the history rows it has not seen through the two exchange phases this half
adds to every round (``phases``, ``aggregators/fedkseed_sync.py``) and replays them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedfm.aggregators.fedkseed_pro import add_scores, init_scores
from fedfm.aggregators.fedkseed_sync import GROUP, sync_phases
from fedfm.aggregators.server_part import ServerPartBase, register_server_part
from fedfm.aggregators.zo_payload import weights_of
from fedfm.aggregators.zo_replay import round_delta, seed_pool
from fedfm.core.protocols import RoundContext
from fedfm.core.types import MODEL, ServerState, State

SEEDS, GRADS = "seeds", "grads"


def round_coefficients(payloads: Sequence[State], weights: Sequence[float], num_seeds: int, lr: float) -> torch.Tensor:
    """c[k] = -lr * sum_i w_i sum_{j: s_ij = k} g_ij with w normalised to sum 1 (float64
    sums, float32 result)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"fedkseed: client weights {list(weights)} do not sum to a positive number")
    acc = torch.zeros(num_seeds, dtype=torch.float64)
    for i, (p, w) in enumerate(zip(payloads, weights)):
        seeds, grads = p[SEEDS].to(torch.int64).reshape(-1), p[GRADS].to(torch.float64).reshape(-1)
        if seeds.numel() and (int(seeds.min()) < 0 or int(seeds.max()) >= num_seeds):
            raise ValueError(f"fedkseed: payload {i} names seed indices outside 0..{num_seeds - 1}")
        acc.index_add_(0, seeds, grads * (w / total))
    return (-lr * acc).to(torch.float32)


class FedKSeedServer(ServerPartBase):
    sends_state = False

    def __init__(self, params, num_clients: int):
        self.params = params
        self.pool = seed_pool(params.pool_seed, params.num_seeds)

    def init(self, model: State) -> ServerState:
        group = {"coef": torch.zeros((0, self.params.num_seeds), dtype=torch.float32)}
        if self.params.seed_sampling == "score":  # FedKSeed-Pro: per-seed amplitude statistics
            group.update(init_scores(self.params.num_seeds))
        return {GROUP: group}

    def broadcast_reference(self, cid: int, shared: State) -> dict[str, State]:
        return {}

    def phases(self) -> list:
        return sync_phases(self.params)

    def payload_spec(self, shared: State) -> State:
        steps = self.params.steps
        return {SEEDS: torch.zeros(steps, dtype=torch.int64), GRADS: torch.zeros(steps, dtype=torch.float32)}

    def combine(self, server_state: ServerState, payloads: Sequence[State], mean_delta: State, ctx: RoundContext):
        row = round_coefficients(payloads, weights_of(payloads), self.params.num_seeds, self.params.lr)
        history = torch.cat([server_state[GROUP]["coef"], row.unsqueeze(0)], 0)
        group = {"coef": history}
        if self.params.seed_sampling == "score":
            scores = {k: server_state[GROUP][k] for k in ("amp", "count")}
            for p in payloads:
                scores = add_scores(scores, p[SEEDS], p[GRADS], self.params.score_clip)
            group.update(scores)
        return {GROUP: group}, round_delta(row, self.pool, server_state[MODEL])


register_server_part("fedkseed", FedKSeedServer)
