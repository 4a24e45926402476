"""FedBPT's client (Sun et al. 2024a, "FedBPT: Efficient Federated Black-box Prompt Tuning
for Large Language Models"; the projection from BBT, Sun et al. 2022, "Black-Box Tuning
for Language-Model-as-a-Service").

The client never sees weights or gradients. ``local_update`` has two halves:

- the provider's: rebuild the global State (the base trainable State with the prompt
  ``p_0 + A m``, from the broadcast mean ``m``; the server sends no State), load it into
  the one base model and wrap it in an
  ``InferenceAPI`` (``learners/blackbox_api.py``) that returns only the loss or the logits
  for given prompt embeddings;
- the client's (``search``): given only that API, its own batches, the current prompt, the
  projection ``A`` and the global step size, run ``generations`` iterations of CMA-ES (the
  ``cma`` package, Hansen's reference implementation) over x in R^d with the prompt
  ``p + A x``, each candidate scored by one API call on a minibatch, starting from x = 0
  and the identity covariance.

It sends the final mean of its search distribution (relative to its start) and its final
step size: two tensors, ``mean`` (d,) and ``sigma`` (1,); the server half
(``aggregators/fedbpt.py``) averages them and moves the prompt. Forward passes per
generation: the population size. ``cma`` seeds numpy's global generator from its
``seed`` option (derived from run seed, round and client), so runs repeat exactly.

Tasks: text classification and causal LM. On a causal LM the API's loss is that of the
sequence given the soft prompt: peft prepends the virtual tokens, and the task drops their
logits (``tasks/causal_lm.continuation_logits``) before the next-token loss.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators.fedbpt import BROADCAST, MEAN, SIGMA, projection, prompt_name, prompt_of
from fedfm.core.seeding import derive_seed
from fedfm.core.types import Instruction, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.blackbox_api import InferenceAPI, make_inference_api
from fedfm.learners.zo_core import cycle_batches
from fedfm.peft.state import set_state

CMA_TAG = 0xC3A


class FedBPTParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dim: int = Field(50, ge=2, description="d: dimension of the search space projected into the prompt")
    sigma0: float = Field(1.0, gt=0, description="CMA-ES step size before the first aggregation")
    popsize: int | None = Field(None, ge=2, description="CMA-ES population (forward passes per generation); default 4 + 3 ln d")
    generations: int = Field(10, ge=1, description="CMA-ES iterations per client round")
    projection_std: float = Field(0.05, gt=0, description="a unit-entry x moves each prompt entry by about this much (BBT: the word-embedding std)")
    projection_seed: int = Field(0, description="seeds the fixed random projection A, shared by clients and server")


def search(api: InferenceAPI, batches, start: torch.Tensor, a: torch.Tensor, sigma: float, params: FedBPTParams,
           seed: int) -> tuple[np.ndarray, float, dict[str, float]]:
    """CMA-ES through the API only: (final mean shift, final sigma, metrics)."""
    import cma

    opts = {"seed": seed % (2**31 - 2) + 1, "verbose": -9, "maxiter": params.generations}
    if params.popsize is not None:
        opts["popsize"] = params.popsize
    es = cma.CMAEvolutionStrategy(np.zeros(params.dim), sigma, opts)
    flat = start.reshape(-1)
    last = []
    for _ in range(params.generations):
        batch = next(batches)
        xs = es.ask()
        last = [api.loss((flat + a @ torch.as_tensor(x, dtype=torch.float32)).view(api.prompt_shape), batch) for x in xs]
        es.tell(xs, last)
    metrics = {
        "train_loss": float(np.mean(last)),
        "steps": float(params.generations),
        "forward_passes": float(params.generations * es.popsize),
        "popsize": float(es.popsize),
    }
    return np.asarray(es.mean, dtype=np.float64), float(es.sigma), metrics


class FedBPTLearner:
    def __init__(self, params: FedBPTParams):
        self.params = params
        self._a: torch.Tensor | None = None

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        if not ctx.examples:
            raise ValueError(f"fedbpt: client {ctx.cid} has no training examples")
        p = self.params
        base = ctx.extras.get("base_state")
        group = instruction.broadcast.get(BROADCAST)
        if base is None or group is None:
            raise ValueError(f"fedbpt: client {ctx.cid} needs the base State (ctx.extras['base_state']) and the "
                             f"'{BROADCAST}' broadcast group (mean, sigma) to rebuild the prompt")
        name = prompt_name(base)
        if self._a is None:
            self._a = projection(base[name].numel(), p.dim, p.projection_seed, p.projection_std)
        state = {**base, **instruction.state, name: prompt_of(base[name], self._a, group[MEAN]).to(base[name].dtype)}
        # the provider's side: the model stays behind the API
        set_state(ctx.model, state)
        api = make_inference_api(ctx.model, ctx.task, name)
        # the client's side
        start = state[name].to(torch.float32)
        sigma = float(group[SIGMA].reshape(-1)[0])
        batches = cycle_batches(ctx, torch.Generator().manual_seed(ctx.seed))
        shift, sigma_out, metrics = search(api, batches, start, self._a, sigma, p, derive_seed(ctx.seed, CMA_TAG))
        payload = {MEAN: torch.tensor(shift, dtype=torch.float32), SIGMA: torch.tensor([sigma_out], dtype=torch.float32)}
        return Update(cid=ctx.cid, payload=payload, num_examples=len(ctx.examples), metrics=metrics)


register_learner("fedbpt", FedBPTLearner, FedBPTParams)
