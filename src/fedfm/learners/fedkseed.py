"""FedKSeed's client (Qin et al. 2024, "Federated Full-Parameter Tuning of Billion-Sized
Language Models with Communication Cost under 18 Kilobytes", Algorithm 1).

Everyone shares a pool of K seeds (``aggregators/zo_replay.seed_pool``, from
``pool_seed``). Each round a client draws ``steps`` seed indices uniformly from the pool,
runs one MeZO step per index along that seed's direction (``learners/zo_core.py``), and
sends only the pairs (seed index, projected-gradient scalar): the payload is two tensors,
``seeds`` int64 (steps,) and ``grads`` float32 (steps,), 12 bytes a step plus the
safetensors header, whatever the model's size.

The current model is a function of the history: ``w_r = w_{r-1} + D(c_r)``, c_r the
server's per-seed coefficient row of round r (``aggregators/fedkseed.py``). A client
given the history in the broadcast group ``fedkseed_history`` (entry ``coef``, (rounds,
K)) rebuilds the model by replaying it, from its last known round (the model and round it
cached in its client store when ``cache`` is on; off by default while the loop still sends
the State, since the cache is a full copy of it per client) or from the base model
(``LocalContext.extras['base_state']``), bit-identically to the server. Until the round
loop can broadcast a group shaped unlike the State (docs/zeroth_order.md), the loop sends
the State itself and the client starts from it.

Not implemented: the paper's non-uniform seed sampling by score (its FedKSeed-Pro);
seeds are drawn uniformly.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators.fedkseed import BROADCAST, GRADS, SEEDS
from fedfm.aggregators.zo_replay import replay, seed_pool
from fedfm.core.seeding import derive_seed
from fedfm.core.types import Instruction, State, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.zo_core import zo_train
from fedfm.peft.state import set_state

SAMPLE_TAG = 0x5A3
MODEL_KEY = "fedkseed_model"
ROUND_KEY = "fedkseed_round"


class FedKSeedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_seeds: int = Field(4096, ge=1, description="K: the size of the shared seed pool")
    steps: int = Field(200, ge=1, description="zeroth-order steps per round = (seed, scalar) pairs sent")
    lr: float = Field(1e-4, gt=0, description="zeroth-order learning rate, on the client and in the server's replay")
    eps: float = Field(1e-3, gt=0, description="perturbation scale epsilon of the two-point estimate")
    pool_seed: int = Field(0, description="derives the K pool seeds, shared by every client and the server")
    cache: bool = Field(
        False,
        description="keep the model a round started from, and that round, in the client store, to replay only newer "
        "rounds; useful once the loop sends the history instead of the State (a full copy of the State per client)",
    )


class FedKSeedLearner:
    def __init__(self, params: FedKSeedParams):
        self.params = params
        self.pool = seed_pool(params.pool_seed, params.num_seeds)

    def rebuild(self, ctx: LocalContext, history: torch.Tensor) -> State:
        """The model after ``len(history)`` rounds: replayed from the cached round or the base."""
        start, state = 0, None
        if self.params.cache and ctx.store is not None:
            cached, tag = ctx.store.get(ctx.cid, MODEL_KEY), ctx.store.get(ctx.cid, ROUND_KEY)
            if cached is not None and tag is not None and int(tag["round"]) <= history.shape[0]:
                start, state = int(tag["round"]), cached
        if state is None:
            base = ctx.extras.get("base_state")
            if base is None:
                raise ValueError(
                    f"fedkseed: client {ctx.cid} has no cached model and no base State "
                    "(LocalContext.extras['base_state']) to replay the history from"
                )
            state = {k: v.clone() for k, v in base.items()}
        return replay(state, history[start:], self.pool)

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        p = self.params
        group = instruction.broadcast.get(BROADCAST)
        if group is not None:
            history = group["coef"]
            state = self.rebuild(ctx, history)
            known = history.shape[0]
        else:
            state, known = instruction.state, instruction.round - 1
        if p.cache and ctx.store is not None:
            ctx.store.put(ctx.cid, MODEL_KEY, state)
            ctx.store.put(ctx.cid, ROUND_KEY, {"round": torch.tensor(known, dtype=torch.int64)})
        set_state(ctx.model, state)
        gen = torch.Generator().manual_seed(derive_seed(ctx.seed, SAMPLE_TAG))
        idx = torch.randint(p.num_seeds, (p.steps,), generator=gen, dtype=torch.int64)
        grads, metrics = zo_train(ctx, p.steps, p.eps, p.lr, lambda t: self.pool[int(idx[t])])
        payload = {SEEDS: idx, GRADS: torch.tensor(grads, dtype=torch.float32)}
        return Update(cid=ctx.cid, payload=payload, num_examples=len(ctx.examples), metrics=metrics)


register_learner("fedkseed", FedKSeedLearner, FedKSeedParams)
