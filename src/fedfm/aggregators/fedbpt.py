"""FedBPT's server half (Sun et al. 2024a, "FedBPT: Efficient Federated Black-box Prompt
Tuning for Large Language Models"): a server-level CMA-ES whose population is the clients'
final search means.

The prompt is ``p = p_0 + A x``: ``A`` a fixed random projection (``projection``,
(prompt entries, d), N(0, (projection_std / sqrt(d))^2), seeded by ``projection_seed``)
from the d-dimensional search space into the soft prompt's embeddings (Sun et al. 2022's
BBT construction), ``p_0`` the initial prompt. The global distribution is a CMA-ES (the
``cma`` package, Hansen's reference implementation) over x, as in the authors' code
(NVIDIA/NVFlare ``research/fed-bpt``, ``src/global_es.py`` and ``src/fedbpt_train.py``):

- the server's ES starts at mean 0 with step size ``sigma0``, identity covariance,
  population size and number of parents ``m`` = the clients sampled per round;
- each client starts its local CMA-ES from a light copy of the global ES (its mean, step
  size and covariance; ``cma``'s ``_copy_light``, with the learner's population size and
  ``generations`` iterations, as the authors' clients do) and sends its final mean, the
  fitness of that mean (its loss on the client's own training examples) and the sum of
  its step sizes squared over its iterations (payload ``mean`` (d,), ``fitness`` (1,),
  ``sigma_sq`` (1,), float64);
- the server sets its ES's step size to ``sqrt(sum_i sigma_sq_i / m / mu_local)``
  (``mu_local``: the parents of a client's population), asks (the asked points are not
  used) and tells it the m client means ranked by their fitness: CMA-ES's weighted
  recombination (for m = 2 the weights are 0.804 and 0.196) and its covariance and
  step-size updates;
- the step size clients start from next round is ``sigma_after / sigma_before`` (the
  server ES's own step-size change in that tell) times the one they started from this
  round (``next_client_sigma``). The authors' code then clamps it at 0.5 from below and
  right away at the unclamped value from above, which undoes the clamp; so no floor is
  applied here either.

The model's prompt is ``p_0 + A m`` with m the ES's mean (the pseudo-gradient is that
minus the current prompt, so rounding does not accumulate; every other trainable entry,
e.g. the frozen classification head, gets zero). Client example counts play no part (the
authors' server ranks, it does not average).

Server state (group ``fedbpt.dist``, checkpointed as tensors): ``p0``; the distribution
clients start from, ``mean`` (d,), ``sigma`` (1,), ``cov`` (d, d), float64; and the
history that determines the ES: every told client mean and fitness (``sol`` (N, d),
``fit`` (N,)), the number told per round (``told``, 0 for a round skipped) and the step
size set before each tell (``sigma_set``). ``global_es`` rebuilds the ES by replaying the
history from a fresh ES (a few d x d updates per round, run in every aggregation: nothing
about the ES lives outside the server state, so a resumed run is bit-identical; the
points ``ask`` draws do not enter ``tell``, tested). CMA-ES's recombination needs all m
parents and the authors' server waits for every client, so the part declares
``fewest_updates`` = m: the round loop retries a round that lost a client (dropped, failed,
rejected) with a fresh sample, or skips it (``federation.on_too_few``); ``combine`` called
directly with fewer leaves the distribution unchanged (``told`` 0).

The server sends no State (``sends_state = False``): the broadcast group ``fedbpt`` holds
``mean`` (d,), ``sigma`` (1,) and ``cov`` (d, d), float64, and the client rebuilds its
State as the base trainable State with the prompt ``p_0 + A m`` (``prompt_of``, the same
operations as the server's; equal to the server's prompt up to one float32 rounding of the
subtraction and addition that apply the pseudo-gradient). Payloads reach this half
through the ``non_state_payload`` step; ``aggregator.rule`` must be fedavg (ignored).
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch

from fedfm.aggregators.server_part import ServerPartBase, register_server_part
from fedfm.aggregators.zo_replay import standard_normal
from fedfm.core.protocols import RoundContext
from fedfm.core.seeding import derive_seed
from fedfm.core.types import MODEL, ServerState, State

GROUP = "fedbpt.dist"
BROADCAST = "fedbpt"
P0 = "p0"
MEAN, SIGMA, COV = "mean", "sigma", "cov"
FITNESS, SIGMA_SQ = "fitness", "sigma_sq"
HISTORY = ("sol", "fit", "told", "sigma_set")
PROJECTION_TAG = 0xB27
GLOBAL_TAG = 0xB28
F64 = torch.float64


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


def local_popsize(params) -> int:
    """A client's CMA-ES population: ``popsize``, or cma's default int(4 + 3 ln d)."""
    return params.popsize if params.popsize is not None else int(4 + 3 * math.log(params.dim))


def local_mu(params) -> int:
    """The parents of a client's population (cma's ``RecombinationWeights(popsize).mu``)."""
    from cma.recombination_weights import RecombinationWeights

    return int(RecombinationWeights(local_popsize(params)).mu)


def next_client_sigma(before: float, after: float, client_sigma: float) -> float:
    """The step size clients start from next round: the server ES's step-size ratio in
    this round's tell times the one they started from (the authors' clamp at 0.5 is
    undone by their next line, so none is applied)."""
    return after / before * client_sigma


def server_tell(es, solutions: np.ndarray, fitnesses: np.ndarray, sigma: float, client_sigma: float) -> float:
    """One round of the server ES: step size ``sigma``, ask, tell the client means ranked
    by fitness; leaves the ES at, and returns, the clients' next step size."""
    import cma

    es.sigma = sigma
    with warnings.catch_warnings():  # told points are not the asked ones: cma's injection warning
        warnings.simplefilter("ignore", cma.evolution_strategy.InjectionWarning)
        es.ask()
        es.tell([np.array(x, dtype=np.float64) for x in solutions], [float(f) for f in fitnesses])
    es.sigma = next_client_sigma(sigma, float(es.sigma), client_sigma)
    return float(es.sigma)


def global_es(dim: int, sigma0: float, m: int, seed: int, group: State):
    """The server ES after the rounds recorded in ``group``, replayed from a fresh one."""
    import cma

    opts = {"seed": seed % (2**31 - 2) + 1, "popsize": m, "CMA_mu": m, "verbose": -9}
    es = cma.CMAEvolutionStrategy(np.zeros(dim), sigma0, opts)
    sol, fit = group["sol"].numpy(), group["fit"].numpy()
    start = 0
    for k, sigma in zip(group["told"].tolist(), group["sigma_set"].tolist()):
        if k:
            server_tell(es, sol[start:start + k], fit[start:start + k], sigma, float(es.sigma))
            start += k
    return es


def sigma_from_clients(sigma_sq: Sequence[float], m: int, mu: int) -> float:
    """sqrt(sum over clients and their iterations of sigma^2 / m / mu_local)."""
    return math.sqrt(float(sum(sigma_sq)) / m / mu)


class FedBPTServer(ServerPartBase):
    broadcast_groups = (BROADCAST,)
    sends_state = False

    def __init__(self, params, num_clients: int):
        self.params = params
        self._a: torch.Tensor | None = None

    def fewest_updates(self, sample_size: int) -> int:
        return sample_size  # the server ES recombines every sampled client's mean

    def matrix(self, prompt: torch.Tensor) -> torch.Tensor:
        if self._a is None:
            self._a = projection(prompt.numel(), self.params.dim, self.params.projection_seed, self.params.projection_std)
        return self._a

    def init(self, model: State) -> ServerState:
        d = self.params.dim
        p0 = model[prompt_name(model)].detach().clone().to(torch.float32)
        history = {"sol": torch.zeros((0, d), dtype=F64), "fit": torch.zeros(0, dtype=F64),
                   "told": torch.zeros(0, dtype=torch.int64), "sigma_set": torch.zeros(0, dtype=F64)}
        return {GROUP: {MEAN: torch.zeros(d, dtype=F64), SIGMA: torch.tensor([self.params.sigma0], dtype=F64),
                        COV: torch.eye(d, dtype=F64), P0: p0, **history}}

    def broadcast(self, server_state: ServerState) -> dict[str, State]:
        dist = server_state[GROUP]
        return {BROADCAST: {MEAN: dist[MEAN], SIGMA: dist[SIGMA], COV: dist[COV]}}

    def broadcast_reference(self, cid: int, shared: State) -> dict[str, State]:
        d = self.params.dim
        return {BROADCAST: {MEAN: torch.zeros(d, dtype=F64), SIGMA: torch.zeros(1, dtype=F64), COV: torch.zeros((d, d), dtype=F64)}}

    def payload_spec(self, shared: State) -> State:
        return {MEAN: torch.zeros(self.params.dim, dtype=F64), FITNESS: torch.zeros(1, dtype=F64), SIGMA_SQ: torch.zeros(1, dtype=F64)}

    def combine(self, server_state: ServerState, payloads: Sequence[State], mean_delta: State, ctx: RoundContext):
        dist = server_state[GROUP]
        m = ctx.sample_size if ctx is not None and ctx.sample_size else len(payloads)
        seed = derive_seed(ctx.seed if ctx is not None else 0, GLOBAL_TAG)
        new = dict(dist)
        if len(payloads) < m:  # too few parents for the server ES: the distribution stays
            new.update(told=torch.cat([dist["told"], torch.zeros(1, dtype=torch.int64)]),
                       sigma_set=torch.cat([dist["sigma_set"], torch.zeros(1, dtype=F64)]))
        else:
            sols = torch.stack([p[MEAN].to(F64).reshape(-1) for p in payloads])  # (m, d)
            fits = torch.cat([p[FITNESS].to(F64).reshape(-1)[:1] for p in payloads])  # (m,)
            sigma = sigma_from_clients([float(p[SIGMA_SQ].reshape(-1)[0]) for p in payloads], m, local_mu(self.params))
            es = global_es(self.params.dim, self.params.sigma0, m, seed, dist)
            server_tell(es, sols.numpy(), fits.numpy(), sigma, float(es.sigma))  # es.sigma: this round's client sigma
            new.update(sol=torch.cat([dist["sol"], sols]), fit=torch.cat([dist["fit"], fits]),
                       told=torch.cat([dist["told"], torch.tensor([len(payloads)])]),
                       sigma_set=torch.cat([dist["sigma_set"], torch.tensor([sigma], dtype=F64)]),
                       **{MEAN: torch.tensor(es.mean, dtype=F64), SIGMA: torch.tensor([es.sigma], dtype=F64),
                          COV: torch.tensor(np.array(es.sm.C), dtype=F64)})
        model = server_state[MODEL]
        name = prompt_name(model)
        delta = {k: torch.zeros_like(v) for k, v in model.items()}
        target = prompt_of(dist[P0], self.matrix(model[name]), new[MEAN])
        delta[name] = (target - model[name].to(torch.float32)).to(model[name].dtype)
        return {GROUP: new}, delta

    def report(self, server_state: ServerState) -> dict:
        """The round's row: how many client means the server ES was told (0: fewer than the
        m sampled arrived, the distribution stayed) and the step size clients start from next."""
        dist = server_state[GROUP]
        told = dist["told"]
        return {"fedbpt.told": int(told[-1]) if told.numel() else 0, "fedbpt.sigma": float(dist[SIGMA].reshape(-1)[0])}


register_server_part("fedbpt", FedBPTServer)
