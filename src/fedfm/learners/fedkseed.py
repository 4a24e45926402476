"""FedKSeed's client (Qin et al. 2024, "Federated Full-Parameter Tuning of Billion-Sized
Language Models with Communication Cost under 18 Kilobytes", Algorithm 1).

Everyone shares a pool of K seeds (``aggregators/zo_replay.seed_pool``, from
``pool_seed``). Each round a client draws ``steps`` seed indices uniformly from the pool,
runs one MeZO step per index along that seed's direction (``learners/zo_core.py``), and
sends only the pairs (seed index, projected-gradient scalar): the payload is two tensors,
``seeds`` int64 (steps,) and ``grads`` float32 (steps,), 12 bytes a step plus the
safetensors header, whatever the model's size.

The current model is a function of the history: ``w_r = w_{r-1} + D(c_r)``, c_r the
server's per-seed coefficient row of round r (``aggregators/fedkseed.py``). The server
sends no State: before training, the exchange phases of ``aggregators/fedkseed_sync.py``
send the client the history rows it has not seen (all of them to a fresh client), and the
client replays them onto its cached model or the base State, bit-identically to the
server, into its client store; ``local_update`` trains from that model. ``cache`` keeps
it (a full copy of the trainable State per client, on disk) so that the next round needs
only the newer rows; without it every round replays the whole history from the base.

Seed sampling (``seed_sampling``): ``uniform`` (FedKSeed: the client draws its indices
itself) or ``score`` (FedKSeed-Pro: the server draws them with probabilities from each
seed's history of projected-gradient amplitudes and sends them with the history rows;
``aggregators/fedkseed_pro.py``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators.fedkseed import GRADS, SEEDS
from fedfm.aggregators.fedkseed_sync import MODEL_KEY, ROUND_KEY
from fedfm.aggregators.zo_replay import seed_pool
from fedfm.core.seeding import derive_seed
from fedfm.core.types import Instruction, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.zo_core import zo_train

SAMPLE_TAG = 0x5A3


class FedKSeedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_seeds: int = Field(4096, ge=1, description="K: the size of the shared seed pool")
    steps: int = Field(200, ge=1, description="zeroth-order steps per round = (seed, scalar) pairs sent")
    lr: float = Field(1e-4, gt=0, description="zeroth-order learning rate, on the client and in the server's replay")
    eps: float = Field(1e-3, gt=0, description="perturbation scale epsilon of the two-point estimate")
    pool_seed: int = Field(0, description="derives the K pool seeds, shared by every client and the server")
    seed_sampling: Literal["uniform", "score"] = Field(
        "uniform",
        description="uniform: each client draws its seeds uniformly (FedKSeed); score: the server draws them by "
        "the seeds' mean clipped |projected gradient| so far, softmax of the min-max normalised scores (FedKSeed-Pro)",
    )
    score_clip: float = Field(1.0, gt=0, description="seed_sampling score: |projected gradient| is clipped at this before averaging")
    cache: bool = Field(
        False,
        description="keep the model a round started from in the client store (a full copy of the trainable State per "
        "client, on disk), so the next round is sent and replays only the newer history rows",
    )


class FedKSeedLearner:
    def __init__(self, params: FedKSeedParams):
        self.params = params
        self.pool = seed_pool(params.pool_seed, params.num_seeds)

    def start_state(self, instruction: Instruction, ctx: LocalContext) -> torch.Tensor | None:
        """Load the model this round starts from (rebuilt by the ``fedkseed_history`` phase)
        into ``ctx.model``, one tensor at a time; returns the seed indices the server drew
        for this round (``seed_sampling: score``), or None."""
        tag = ctx.store.get(ctx.cid, ROUND_KEY) if ctx.store is not None else None
        if tag is None or int(tag["round"].reshape(-1)[0]) != instruction.round:
            raise ValueError(
                f"fedkseed: client {ctx.cid} holds no model rebuilt for round {instruction.round}: the "
                "fedkseed_known/fedkseed_history exchange phases did not run before training"
            )
        params = {n: p.data for n, p in ctx.model.named_parameters() if p.requires_grad}
        local = {k: v for k, v in instruction.state.items() if k in params}  # only the client's local (peft.local) entries
        shared = {n: t for n, t in params.items() if n not in local}
        if not ctx.store.read_into(ctx.cid, MODEL_KEY, shared):
            raise ValueError(f"fedkseed: client {ctx.cid} has a round tag but no rebuilt model in its store")
        with torch.no_grad():
            for k, v in local.items():
                params[k].copy_(v)
        if not self.params.cache:
            ctx.store.delete(ctx.cid, MODEL_KEY)
            ctx.store.delete(ctx.cid, ROUND_KEY)
        return tag.get("seeds")

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        p = self.params
        drawn = self.start_state(instruction, ctx)
        if p.seed_sampling == "score":
            if drawn is None or drawn.numel() != p.steps:
                raise ValueError(f"fedkseed: client {ctx.cid} was sent no draw of {p.steps} seed indices for round "
                                 f"{instruction.round} (seed_sampling: score; got {None if drawn is None else drawn.numel()})")
            idx = drawn.to(torch.int64).reshape(-1)
        else:
            gen = torch.Generator().manual_seed(derive_seed(ctx.seed, SAMPLE_TAG))
            idx = torch.randint(p.num_seeds, (p.steps,), generator=gen, dtype=torch.int64)
        grads, metrics = zo_train(ctx, p.steps, p.eps, p.lr, lambda t: self.pool[int(idx[t])])
        payload = {SEEDS: idx, GRADS: torch.tensor(grads, dtype=torch.float32)}
        return Update(cid=ctx.cid, payload=payload, num_examples=len(ctx.examples), metrics=metrics)


register_learner("fedkseed", FedKSeedLearner, FedKSeedParams)
