"""Federated black-box discrete prompt learning: BDPL's client (Diao et al. 2022,
"Black-box Prompt Learning for Pre-trained Language Models"), averaged by the server as in
the text-classification setting of Fed-BBPT (Lin et al. 2023, "Efficient Federated Prompt
Tuning for Black-box Large Pre-trained Models"), whose clients train the prompt's
distribution through an inference API and send it for aggregation.

The client sees only an inference API (``learners/blackbox_api.py``: prompt token ids and a
batch in, the loss out) and the public candidate tokens. With ``peft.method:
discrete_prompt`` (n positions, K candidates, ``p_i`` the distribution of position ``i``),
each local step draws I prompts ``S_1..S_I`` (``S_k,i ~ p_i``, independently), asks the
API for their losses ``L_k`` on one minibatch, and takes BDPL's variance-reduced policy
gradient step

    g_i = 1/(I-1) sum_k (L_k - mean(L)) grad_{p_i} log P(S_k),   grad_{p_i,j} log P(S) = [S_i = j] / p_i,j
    p_i <- proj_simplex(p_i - lr g_i)

(``proj_simplex``: the Euclidean projection onto the probability simplex, Duchi et al.
2008, sort-based). No gradient of the model is ever computed: I forward passes per step.
The client sends ``p_new - p_global``; the server's rule combines those deltas (FedAvg: the
mean distribution). A received distribution is projected onto the simplex before use, so
a rule or codec that leaves it (a median, sparsification) cannot break the sampling.
Draws come from a generator seeded by the client seed (run seed, round, client).

Differences from BDPL: candidates are a seeded vocabulary sample (``peft/discrete_prompt.py``),
not PMI n-grams of the training text; the loss is the task's cross-entropy: through the
model's classification head with ``text_classification`` (on a model whose head is
untrained the prompt can only do what that head allows, as for ``fedbpt``), or through a
causal LM's label words with ``lm_classification`` (``tasks/verbalizer.py``: BDPL reads
an MLM verbalizer at ``[MASK]``, here the next token after the template's answer cue; the
prompt goes right before the text).

Refused at config time (``bdpl_config_problems``): ``bdpl`` without ``discrete_prompt``
and the reverse (argmax has no gradient for another learner), another task than
``text_classification`` or ``lm_classification``, and ``peft.local``.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.core.seeding import derive_seed
from fedfm.core.types import Instruction, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.blackbox_api import InferenceAPI, served
from fedfm.learners.local import delta_update
from fedfm.learners.loop import planned_steps
from fedfm.learners.zo_core import cycle_batches
from fedfm.peft.discrete_prompt import PROBS
from fedfm.peft.state import set_state

BDPL_TAG = 0xBD91
# an encoder's classification head, or a causal LM's label words (tasks/verbalizer.py)
BDPL_TASKS = ("text_classification", "lm_classification")


class BdplParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: int = Field(8, ge=2, description="I: prompts drawn per step (API calls per step)")
    lr: float | None = Field(None, gt=0, description="step size on the distributions; default train.lr")
    steps: int | None = Field(None, ge=1, description="steps per round; default train.steps or epochs x batches")


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Each row of ``v`` (.., K) projected onto {p >= 0, sum p = 1} (Euclidean)."""
    u = torch.sort(v, dim=-1, descending=True).values
    css = torch.cumsum(u, dim=-1) - 1.0
    k = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype, device=v.device)
    rho = ((u - css / k) > 0).sum(dim=-1, keepdim=True)  # the largest j with u_j > (css_j) / j
    theta = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return torch.clamp(v - theta, min=0.0)


def policy_gradient(probs: torch.Tensor, samples: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """BDPL's variance-reduced estimate (n, K) from ``samples`` (I, n) candidate indices and
    their ``losses`` (I,)."""
    centered = losses - losses.mean()
    grad = torch.zeros_like(probs)
    rows = torch.arange(probs.shape[0])
    for s, c in zip(samples, centered):
        grad[rows, s] += c / probs[rows, s]
    return grad / (samples.shape[0] - 1)


def make_token_api(model: torch.nn.Module, task) -> InferenceAPI:
    """The provider's side: the loss (and logits) of a batch with given prompt token ids."""
    holder = model.discrete_prompt
    shape = (holder.probs.shape[0],)
    vocab = model.get_input_embeddings().weight.shape[0]

    def call(ids: torch.Tensor, fn):
        if tuple(ids.shape) != shape or ids.dtype != torch.long or int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"prompt must be {shape[0]} token ids below {vocab} (got {tuple(ids.shape)}, {ids.dtype})")
        def swap():
            holder.override = ids.clone()
            return lambda: setattr(holder, "override", None)

        return served(model, swap, fn)

    def loss(ids, batch):
        return call(ids, lambda: task.loss(model, batch).item())

    def logits(ids, batch):
        return call(ids, lambda: model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().clone())

    return InferenceAPI(loss, logits, shape)


class BdplLearner:
    def __init__(self, params: BdplParams):
        self.params = params

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        p = self.params
        if not ctx.examples:
            raise ValueError(f"client {ctx.cid} has no training examples")
        set_state(ctx.model, instruction.state)
        holder = ctx.model.discrete_prompt
        candidates = holder.candidates.cpu()  # public: derived from the config
        api = make_token_api(ctx.model, ctx.task)
        probs = project_simplex(instruction.state[PROBS].double())  # (n, K)
        steps = p.steps or planned_steps(len(ctx.examples), ctx.train)
        lr = p.lr if p.lr is not None else ctx.train.lr
        gen = torch.Generator().manual_seed(derive_seed(ctx.seed, BDPL_TAG))
        data = cycle_batches(ctx, torch.Generator().manual_seed(ctx.seed))
        loss_sum = 0.0
        for t in range(steps):
            batch = next(data)
            samples = torch.stack([torch.multinomial(probs, 1, generator=gen).squeeze(1) for _ in range(p.samples)])  # (I, n)
            losses = torch.tensor([api.loss(candidates[s], batch) for s in samples], dtype=torch.float64)  # (I,)
            probs = project_simplex(probs - lr * policy_gradient(probs, samples, losses))
            loss_sum += float(losses.mean())
            if ctx.on_step is not None:
                ctx.on_step(t + 1, steps)
        with torch.no_grad():
            holder.probs.copy_(probs.to(holder.probs.dtype))
        metrics = {"train_loss": loss_sum / steps, "steps": float(steps), "forward_passes": float(api.calls[0])}
        return delta_update(instruction, ctx, metrics)


register_learner("bdpl", BdplLearner, BdplParams)


def bdpl_config_problems(exp) -> list[str]:
    learner, method = exp.learner.name, exp.peft.method
    if learner != "bdpl" and method != "discrete_prompt":
        return []
    problems = []
    if learner == "bdpl" and method != "discrete_prompt":
        problems.append(f"learner bdpl learns a discrete prompt's distributions; peft.method must be discrete_prompt (got {method})")
    if method == "discrete_prompt" and learner != "bdpl":
        problems.append(f"peft.method discrete_prompt is trained by learner bdpl only (got {learner}): its tokens are "
                        "chosen by argmax, which gives a gradient-based learner nothing to follow")
    if exp.model.task not in BDPL_TASKS:
        problems.append(f"peft.method discrete_prompt / learner bdpl: model.task {exp.model.task} is not supported "
                        f"(implemented for {', '.join(BDPL_TASKS)})")
    if exp.peft.local:
        problems.append(f"learner bdpl: peft.local {exp.peft.local} is not supported (the distributions are the whole State)")
    from fedfm.aggregators.server_opt import not_as_is

    got = not_as_is(exp.server_optimizer) if learner == "bdpl" else None
    if got is not None:
        problems.append(f"learner bdpl: the server averages the clients' categorical distributions; server_optimizer must "
                        f"be sgd with lr 1.0 (got {got}), whose steps would leave the probabilities off the simplex")
    return problems
