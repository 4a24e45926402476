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

and sets the prompt to ``p_0 + A m`` (the pseudo-gradient is that minus the current
prompt, so rounding does not accumulate; every other trainable entry, e.g. the frozen
classification head, gets zero). Covariance matrices are not aggregated: each client starts
CMA-ES from the identity, as in FedBPT.

The server sends no State (``sends_state = False``): the broadcast group ``fedbpt`` holds
only ``mean`` (d,) and ``sigma`` (1,), and the client rebuilds its State as the base
trainable State with the prompt ``p_0 + A m`` (``prompt_of``, the same operations as the
server's; equal to the server's prompt up to one float32 rounding of the subtraction and
addition that apply the pseudo-gradient). ``p_0`` (the initial prompt) is kept in the group
too, so the server needs no other copy. Payloads reach this half through the
``non_state_payload`` step.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedfm.aggregators.server_part import ServerPartBase, register_server_part
from fedfm.aggregators.zo_payload import weights_of
from fedfm.aggregators.zo_replay import standard_normal
from fedfm.core.seeding import derive_seed
from fedfm.core.protocols import RoundContext
from fedfm.core.types import MODEL, ServerState, State

GROUP = "fedbpt.dist"
BROADCAST = "fedbpt"
P0 = "p0"
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
    return standard_normal((numel, dim), g) * (std / dim**0.5)  # float64 draw: the same on every x86 CPU


def prompt_of(p0: torch.Tensor, a: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The prompt ``p_0 + A m`` (float32), computed alike on the server and the client."""
    return (p0.to(torch.float32).reshape(-1) + a @ mean.to(torch.float32)).view(p0.shape)


class FedBPTServer(ServerPartBase):
    broadcast_groups = (BROADCAST,)
    sends_state = False

    def __init__(self, params, num_clients: int):
        self.params = params
        self._a: torch.Tensor | None = None

    def matrix(self, prompt: torch.Tensor) -> torch.Tensor:
        if self._a is None:
            self._a = projection(prompt.numel(), self.params.dim, self.params.projection_seed, self.params.projection_std)
        return self._a

    def init(self, model: State) -> ServerState:
        p0 = model[prompt_name(model)].detach().clone().to(torch.float32)
        return {GROUP: {MEAN: torch.zeros(self.params.dim), SIGMA: torch.tensor([self.params.sigma0]), P0: p0}}

    def broadcast(self, server_state: ServerState) -> dict[str, State]:
        dist = server_state[GROUP]
        return {BROADCAST: {MEAN: dist[MEAN], SIGMA: dist[SIGMA]}}

    def broadcast_reference(self, cid: int, shared: State) -> dict[str, State]:
        return {BROADCAST: {MEAN: torch.zeros(self.params.dim), SIGMA: torch.zeros(1)}}

    def payload_spec(self, shared: State) -> State:
        return {MEAN: torch.zeros(self.params.dim), SIGMA: torch.zeros(1)}

    def combine(self, server_state: ServerState, payloads: Sequence[State], mean_delta: State, ctx: RoundContext):
        w = torch.tensor(weights_of(payloads), dtype=torch.float64)
        w = w / w.sum()
        shift = sum(wi * p[MEAN].to(torch.float64) for wi, p in zip(w.tolist(), payloads))
        sigma = sum(wi * float(p[SIGMA][0]) for wi, p in zip(w.tolist(), payloads))
        dist = server_state[GROUP]
        mean = (dist[MEAN].to(torch.float64) + shift).to(torch.float32)
        new = {MEAN: mean, SIGMA: torch.tensor([sigma], dtype=torch.float32), P0: dist[P0]}
        model = server_state[MODEL]
        name = prompt_name(model)
        delta = {k: torch.zeros_like(v) for k, v in model.items()}
        target = prompt_of(dist[P0], self.matrix(model[name]), mean)
        delta[name] = (target - model[name].to(torch.float32)).to(model[name].dtype)
        return {GROUP: new}, delta


register_server_part("fedbpt", FedBPTServer)
