"""FedBPT's server half (Sun et al. 2024a, "FedBPT: Efficient Federated Black-box Prompt
Tuning for Large Language Models"): the global CMA-ES search distribution.

The prompt is ``p = p_start + A x``: ``A`` a fixed random projection (``projection``,
(prompt entries, d), N(0, (projection_std / sqrt(d))^2), seeded by ``projection_seed``)
from the d-dimensional search space into the soft prompt's embeddings (Sun et al. 2022's
BBT construction). The server keeps the distribution's mean ``m`` (d,) and step size
``sigma`` in the server-state group ``fedbpt.dist`` (checkpointed). Each client runs
CMA-ES from the current prompt with the global ``sigma`` and sends its final mean, relative
to where it started, and its final step size (payload ``mean`` (d,), ``sigma`` (1,)). The
server averages both, weighted by the clients' example counts, as the paper does:

    m <- m + sum_i w_i dm_i,     sigma <- sum_i w_i sigma_i,

and moves the prompt by ``A sum_i w_i dm_i`` (the pseudo-gradient; every other trainable
entry, e.g. the frozen classification head, gets zero). Covariance matrices are not
aggregated: each client starts CMA-ES from the identity, as in FedBPT.

The step size reaches the clients as the broadcast group ``fedbpt_sigma``. The round loop
decodes broadcast groups against the State's names and shapes, so for now that group is
the State's names filled with ``sigma`` (it doubles the downlink of a small prompt State)
until a group may carry its own shapes (docs/zeroth_order.md, "What the round loop needs").
Payloads reach this half through the ``non_state_payload`` step.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedfm.aggregators.server_part import register_server_part
from fedfm.aggregators.zo_payload import weights_of
from fedfm.core.seeding import derive_seed
from fedfm.core.protocols import RoundContext
from fedfm.core.types import MODEL, ServerState, State

GROUP = "fedbpt.dist"
BROADCAST = "fedbpt_sigma"
MEAN, SIGMA = "mean", "sigma"
PROJECTION_TAG = 0xB27


def prompt_name(state: State) -> str:
    names = [k for k in state if "prompt_encoder" in k and k.endswith("embedding.weight")]
    if len(names) != 1:
        raise ValueError(f"fedbpt: expected one soft-prompt embedding in the State (peft.method prompt_tuning), found {names}")
    return names[0]


def projection(numel: int, dim: int, seed: int, std: float) -> torch.Tensor:
    """A: (numel, dim) float32, entries N(0, (std / sqrt(dim))^2), seeded."""
    g = torch.Generator().manual_seed(derive_seed(seed, PROJECTION_TAG, numel, dim))
    return torch.randn((numel, dim), generator=g, dtype=torch.float32) * (std / dim**0.5)


def sigma_of(group: State) -> float:
    """The step size from a ``fedbpt_sigma`` broadcast group (every entry holds it)."""
    return float(next(iter(group.values())).reshape(-1)[0])


class FedBPTServer:
    broadcast_groups = (BROADCAST,)

    def __init__(self, params, num_clients: int):
        self.params = params
        self._a: torch.Tensor | None = None

    def matrix(self, prompt: torch.Tensor) -> torch.Tensor:
        if self._a is None:
            self._a = projection(prompt.numel(), self.params.dim, self.params.projection_seed, self.params.projection_std)
        return self._a

    def init(self, model: State) -> ServerState:
        prompt_name(model)
        return {GROUP: {MEAN: torch.zeros(self.params.dim), SIGMA: torch.tensor([self.params.sigma0])}}

    def broadcast(self, server_state: ServerState) -> dict[str, State]:
        sigma = float(server_state[GROUP][SIGMA][0])
        return {BROADCAST: {k: torch.full_like(v, sigma) for k, v in server_state[MODEL].items()}}

    def payload_spec(self, shared: State) -> State:
        return {MEAN: torch.zeros(self.params.dim), SIGMA: torch.zeros(1)}

    def combine(self, server_state: ServerState, payloads: Sequence[State], mean_delta: State, ctx: RoundContext):
        w = torch.tensor(weights_of(payloads), dtype=torch.float64)
        w = w / w.sum()
        shift = sum(wi * p[MEAN].to(torch.float64) for wi, p in zip(w.tolist(), payloads))
        sigma = sum(wi * float(p[SIGMA][0]) for wi, p in zip(w.tolist(), payloads))
        dist = server_state[GROUP]
        new = {MEAN: (dist[MEAN].to(torch.float64) + shift).to(torch.float32), SIGMA: torch.tensor([sigma], dtype=torch.float32)}
        model = server_state[MODEL]
        name = prompt_name(model)
        delta = {k: torch.zeros_like(v) for k, v in model.items()}
        delta[name] = (self.matrix(model[name]) @ shift.to(torch.float32)).view_as(model[name])
        return {GROUP: new}, delta


register_server_part("fedbpt", FedBPTServer)
