"""FedBPT's client (Sun et al. 2024a, "FedBPT: Efficient Federated Black-box Prompt Tuning
for Large Language Models"; the projection from BBT, Sun et al. 2022, "Black-Box Tuning
for Language-Model-as-a-Service").

The client never sees weights or gradients. ``local_update`` has two halves:

- the provider's: rebuild the global State (the base trainable State with the prompt
  ``p_0 + A m``, from the broadcast mean ``m``; the server sends no State), load it into
  the one base model and wrap it in an
  ``InferenceAPI`` (``learners/blackbox_api.py``) that returns only the loss or the logits
  for given prompt embeddings;
- the client's (``search``): given only that API, its own batches, ``p_0``, the projection
  ``A`` and the global distribution (mean, step size, covariance), run CMA-ES (the ``cma``
  package, Hansen's reference implementation) over x in R^d with the prompt ``p_0 + A x``,
  starting from a light copy of the global ES (``local_es``: its mean, step size and
  covariance, cma's ``_copy_light``, as the authors' clients do) with the learner's
  population, until cma stops it or after ``generations`` iterations; each candidate is
  scored by one API call on a minibatch (a new one each iteration).

It sends its final mean x (d,), the fitness of that mean (its loss over all the client's
training examples, in batches of ``train.batch_size``) and the sum of its step sizes
squared over its iterations: ``mean`` (d,), ``fitness`` (1,), ``sigma_sq`` (1,), float64;
the server half (``aggregators/fedbpt.py``) tells the clients' means to its own CMA-ES.
Forward passes: the population size per iteration, plus one per batch for the fitness.
``cma`` seeds numpy's global generator from its ``seed`` option (derived from run seed,
round and client), so runs repeat exactly.

Differences from the authors' code: each iteration scores its candidates on one minibatch
(theirs: on the client's whole few-shot training set); their optional prompt-norm
clipping and perturbed-data fitness ratio (off by default there) are not implemented.

Tasks: text classification, causal LM and classification by a causal LM's label words.
On a causal LM the API's loss is that of the sequence given the soft prompt: peft prepends
the virtual tokens, and the task drops their logits (``tasks/causal_lm.continuation_logits``)
before the next-token loss. With ``lm_classification`` (``tasks/verbalizer.py``, BBT's
verbalizer on a causal LM's next token) it is the cross-entropy over the label words'
logits at the answer position, which the task counts from the end, past the prompt.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators.fedbpt import (BROADCAST, COV, FITNESS, MEAN, SIGMA, SIGMA_SQ, local_popsize, projection,
                                      prompt_name, prompt_of)
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
    sigma0: float = Field(1.0, gt=0, description="the global CMA-ES's initial step size")
    popsize: int | None = Field(None, ge=2, description="a client's CMA-ES population (forward passes per iteration); default 4 + 3 ln d")
    generations: int = Field(10, ge=1, description="at most this many CMA-ES iterations per client round")
    projection_std: float = Field(0.05, gt=0, description="a unit-entry x moves each prompt entry by about this much (BBT: the word-embedding std)")
    projection_seed: int = Field(0, description="seeds the fixed random projection A, shared by clients and server")


def local_es(mean: np.ndarray, sigma: float, cov: np.ndarray, params: FedBPTParams, seed: int):
    """A client's CMA-ES: a light copy of the global ES (mean, step size, covariance) with
    the client's population and iteration budget, as the authors' clients make it."""
    import cma

    shell = cma.CMAEvolutionStrategy(np.array(mean, dtype=np.float64), sigma, {"seed": seed, "verbose": -9})
    shell.sm.C = np.array(cov, dtype=np.float64)  # the global ES's covariance, which _copy_light copies
    return shell._copy_light(inopts={"seed": seed, "maxiter": params.generations, "popsize": local_popsize(params),
                                     "CMA_mu": None, "verbose": -9})


def search(api: InferenceAPI, batches, p0: torch.Tensor, a: torch.Tensor, es, params: FedBPTParams,
           ) -> tuple[np.ndarray, float, dict[str, float]]:
    """CMA-ES through the API only, from ``es`` (``local_es``): (final mean, sum of the
    step sizes squared over the iterations, metrics)."""
    def prompt(x) -> torch.Tensor:
        return prompt_of(p0, a, torch.as_tensor(x, dtype=torch.float64)).view(api.prompt_shape)

    last, sigma_sq, iterations = [], 0.0, 0
    while not es.stop():
        sigma_sq += float(es.sigma) ** 2
        batch = next(batches)
        xs = es.ask()
        last = [api.loss(prompt(x), batch) for x in xs]
        es.tell(xs, last)
        iterations += 1
    metrics = {
        "train_loss": float(np.mean(last)) if last else float("nan"),
        "steps": float(iterations),
        "forward_passes": float(iterations * es.popsize),
        "popsize": float(es.popsize),
    }
    return np.asarray(es.mean, dtype=np.float64), sigma_sq, metrics


def fitness(api: InferenceAPI, prompt: torch.Tensor, ctx: LocalContext) -> tuple[float, int]:
    """The loss of ``prompt`` over all the client's examples (batches of train.batch_size,
    weighted by their sizes) and the forward passes it took."""
    total, calls, size = 0.0, 0, ctx.train.batch_size
    for start in range(0, len(ctx.examples), size):
        items = ctx.examples[start:start + size]
        total += api.loss(prompt, ctx.task.collate(items, ctx.tokenizer)) * len(items)
        calls += 1
    return total / len(ctx.examples), calls


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
                             f"'{BROADCAST}' broadcast group (mean, sigma, cov) to rebuild the prompt")
        name = prompt_name(base)
        if self._a is None:
            self._a = projection(base[name].numel(), p.dim, p.projection_seed, p.projection_std)
        mean = group[MEAN].to(torch.float64).reshape(-1)
        state = {**base, **instruction.state, name: prompt_of(base[name], self._a, mean).to(base[name].dtype)}
        # the provider's side: the model stays behind the API
        set_state(ctx.model, state)
        api = make_inference_api(ctx.model, ctx.task, name)
        # the client's side
        p0 = base[name].to(torch.float32)
        es = local_es(mean.numpy(), float(group[SIGMA].reshape(-1)[0]), group[COV].to(torch.float64).numpy(), p,
                      derive_seed(ctx.seed, CMA_TAG) % (2**31 - 2) + 1)
        batches = cycle_batches(ctx, torch.Generator().manual_seed(ctx.seed))
        final, sigma_sq, metrics = search(api, batches, p0, self._a, es, p)
        fit, calls = fitness(api, prompt_of(p0, self._a, torch.as_tensor(final)).view(api.prompt_shape), ctx)
        metrics.update(fitness=fit, forward_passes=metrics["forward_passes"] + calls)
        payload = {MEAN: torch.as_tensor(final, dtype=torch.float64).clone(), FITNESS: torch.tensor([fit], dtype=torch.float64),
                   SIGMA_SQ: torch.tensor([sigma_sq], dtype=torch.float64)}
        return Update(cid=ctx.cid, payload=payload, num_examples=len(ctx.examples), metrics=metrics)


register_learner("fedbpt", FedBPTLearner, FedBPTParams)
