"""Progressive layer training for federated further pre-training, FedBFPT-inspired (Wang et
al. 2023, "FedBFPT: An Efficient Federated Learning Framework for BERT Further
Pre-training"; survey section 4.2: "builds a local model for each client, progressively
training the shallower layers of local models while sampling deeper layers, and
aggregating trained parameters on a server to create the final global model").

``learner: {name: fedbfpt, start_depth: 1, rounds_per_stage: 2, sampled_deeper: 1}`` (with
a tuner that trains the layers, e.g. ``peft.method: full``, and ``model.task: masked_lm``):
in round r the client's local model is

- the shallow block: layers ``0 .. d(r) - 1`` with ``d(r) = min(L, start_depth + (r - 1)
  // rounds_per_stage)``, trained;
- ``sampled_deeper`` layers drawn from ``d(r) .. L - 1`` (seeded by the client's round
  seed), in order above the block, run in the forward pass but not trained;

and the other layers are left out of the forward pass (the compute saving: a shallower
model). Only the block's layers and the trainable parameters outside the layer stack
(embeddings, heads) move; every other delta is exactly zero, so the server's mean leaves
those layers as they were.

What is FedBFPT's and what is not: the progressive growth of the trained shallow block and
the sampled deeper layers are; the paper's exact schedule and sampling distribution are
not reproduced (uniform sampling, a fixed number of rounds per stage here), hence
"inspired". The learner lives with the adaptability techniques (``personalize/``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.core.types import Instruction, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.local import delta_update
from fedfm.learners.loop import train_loop
from fedfm.peft.state import set_state


class FedBFPTParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start_depth: int = Field(1, ge=1, description="trained shallow layers in round 1")
    rounds_per_stage: int = Field(1, ge=1, description="rounds before the block grows by one layer")
    sampled_deeper: int = Field(1, ge=0, description="deeper layers sampled into the local model (not trained)")


def depth(rnd: int, num_layers: int, params: FedBFPTParams) -> int:
    """d(r) = min(L, start_depth + (r - 1) // rounds_per_stage)."""
    return min(num_layers, params.start_depth + (max(rnd, 1) - 1) // params.rounds_per_stage)


def local_layers(d: int, num_layers: int, sampled: int, generator: torch.Generator) -> list[int]:
    """Layers of the local model: 0..d-1, then ``sampled`` of d..L-1 (uniform, sorted)."""
    deeper = list(range(d, num_layers))
    k = min(sampled, len(deeper))
    pick = sorted(deeper[i] for i in torch.randperm(len(deeper), generator=generator)[:k].tolist())
    return list(range(d)) + pick


def layer_stack(model: torch.nn.Module) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """(parent, attribute, ModuleList) of the transformer layers (``.layer`` or ``.layers``)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] in ("layer", "layers"):
            parent_name, _, attr = name.rpartition(".")
            return (model.get_submodule(parent_name) if parent_name else model), attr, module
    raise ValueError("learner fedbfpt: the model has no layer stack (a ModuleList named 'layer' or 'layers')")


@contextmanager
def shallow_model(model: torch.nn.Module, keep: list[int]) -> Iterator[torch.nn.ModuleList]:
    parent, attr, full = layer_stack(model)
    setattr(parent, attr, torch.nn.ModuleList([full[i] for i in keep]))
    try:
        yield full
    finally:
        setattr(parent, attr, full)


class FedBFPTLearner:
    def __init__(self, params: FedBFPTParams):
        self.p = params

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        set_state(ctx.model, instruction.state)
        _, _, full = layer_stack(ctx.model)
        d = depth(instruction.round, len(full), self.p)
        keep = local_layers(d, len(full), self.p.sampled_deeper, torch.Generator().manual_seed(ctx.seed))
        frozen = [p for i in keep[d:] for p in full[i].parameters() if p.requires_grad]

        def drop_frozen_grads() -> None:
            for p in frozen:
                p.grad = None

        with shallow_model(ctx.model, keep):
            metrics = train_loop(ctx, after_backward=drop_frozen_grads)
        update = delta_update(instruction, ctx, metrics)
        update.metrics = {**update.metrics, "depth": float(d), "local_layers": float(len(keep))}
        return update


register_learner("fedbfpt", FedBFPTLearner, FedBFPTParams)
