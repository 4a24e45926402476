"""FedMeZO: clients run MeZO locally and send their deltas (Ling et al. 2024, "On the
Convergence of Zeroth-Order Federated Tuning for Large Language Models"; MeZO: Malladi et
al. 2023, "Fine-Tuning Language Models with Just Forward Passes").

Each sampled client starts from the global State, runs ``steps`` MeZO steps
(``learners/zo_core.py``: two forward passes each, no backward, no optimizer state) on its
own minibatches, and returns ``trained - global``: an ordinary delta payload, aggregated by
any rule. One client with all the data is plain MeZO. The perturbation seed of step t is
``derive_seed(client seed, MEZO_TAG, t)``, the client seed being derived from (run seed,
round, client).

Directions (``draws``): ``portable`` (the default) draws them as FedKSeed must, in float64
rounded to float32, the same numbers on every x86 CPU (``aggregators/zo_replay.py``).
Only the client itself regenerates a MeZO client's directions (it sends a delta), so
``native`` may use torch's float32 kernel instead, about 4.5x faster per draw; its numbers
depend on the CPU's SIMD level, so the same run on another CPU trains along other
directions. It pays with full-parameter tuning, where each step draws three directions
the size of the model (``benchmarks/zo_draws.py``); LoRA's are small.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedfm.core.seeding import derive_seed
from fedfm.core.types import Instruction, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.local import delta_update
from fedfm.learners.loop import planned_steps
from fedfm.learners.zo_core import zo_train
from fedfm.peft.state import set_state

MEZO_TAG = 0x3E20


class MezoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    eps: float = Field(1e-3, gt=0, description="perturbation scale epsilon of the two-point estimate")
    lr: float | None = Field(None, gt=0, description="zeroth-order learning rate; default train.lr")
    steps: int | None = Field(None, ge=1, description="MeZO steps per round; default train.steps or epochs x batches")
    draws: Literal["portable", "native"] = Field(
        "portable", description="portable: directions drawn in float64 and rounded (the same numbers on every x86 CPU); "
                                "native: torch's float32 draw, about 4.5x faster per draw, CPU-dependent numbers")


class MezoLearner:
    def __init__(self, params: MezoParams):
        self.params = params

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        p = self.params
        set_state(ctx.model, instruction.state)
        steps = p.steps or planned_steps(len(ctx.examples), ctx.train)
        lr = p.lr if p.lr is not None else ctx.train.lr
        _, metrics = zo_train(ctx, steps, p.eps, lr, lambda t: derive_seed(ctx.seed, MEZO_TAG, t), p.draws == "portable")
        return delta_update(instruction, ctx, metrics)


register_learner("mezo", MezoLearner, MezoParams)
