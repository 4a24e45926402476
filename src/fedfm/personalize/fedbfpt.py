"""FedBFPT's progressive learning with sampled deeper layers (PL-SDL) for federated further
pre-training (Wang, Li, Chen and Shou 2023, "FedBFPT: An Efficient Federated Learning
Framework for BERT Further Pre-training", IJCAI; survey section 4.2).

The schedule is the one of the authors' code (``fed_train`` in ``federated_train.py`` and
``rebuild_model`` / ``train_trans_layer`` / ``train_cls_layer`` / ``federated_efficient_merge``
in ``utils.py`` of github.com/Hanzhouu/FedBFPT), which the journal version (Wang et al. 2025,
Journal of Software 36(9), "FedBT", Algorithm 1 and Fig. 2) describes in words. With I the
run's rounds, L the global model's transformer layers and L_k the local model's:

- **Which layer a client trains in round r** (``layer_schedule``): l = 0 for the first
  ceil(I/2) rounds; then the current layer index moves up by one each time half of the
  remaining rounds is done (round index i = r - 1 counts from 0; ``remain`` starts at I;
  at the start of round i, if ``i == I - floor(remain / 2)`` then l += 1 and ``remain = I -
  i``). I = 5 gives 0, 0, 0, 1, 2; I = 10 gives 0, 0, 0, 0, 0, 1, 1, 1, 2, 3. The layer
  stays below L_k (the paper: "l < L_k"; the authors' code would fail there): rounds past
  it train layer L_k - 1.
- **The local model** (``local_layers``): L_k transformer layers: the global layers 0 .. l
  (0 .. l-1 trained in earlier stages, synchronised, frozen), then L_k - l - 1 layers drawn
  **uniformly with replacement** from the global layers l+1 .. L-1 and sorted (the code's
  ``np.sort(np.random.randint(l + 1, L, size=L_k - l - 1))``; a layer may appear twice),
  run in the forward pass but not trained. Embeddings and the output layer as the global
  model's. The other layers are left out: the compute saving.
- **What is trained**: layer l and the output layer (every trainable parameter outside the
  layer stack and the embeddings: ``cls.*`` of a masked-LM BERT; its decoder weight is
  tied to the frozen word embeddings). Everything else is frozen (``requires_grad`` off for
  the round), so its delta is exactly zero.
- **What the server aggregates**: the trained parameters only: the mean of the clients'
  deltas of layer l and the output layer; every other parameter keeps its value (exact
  zeros average to zero). With ``codecs.up: [{skip_zero: true}]`` only those tensors travel
  up, with ``codecs.down: [{delta: true}, {skip_zero: true}]`` only the changed ones come
  down after the first round (the paper sends one layer and the output layer each way).

What differs from the authors' code: the mean is the aggregator's (``fedavg`` weights
clients by their examples, as the journal version's formula (1); the code averages
unweighted: the same when clients hold equal numbers of examples); the draws come from the
client's round seed (the code uses NumPy's global generator); all clients share one L_k
(the code's commented-out ``random.randint(3, 7)`` per client is not offered). The IJCAI
paper's own text beyond its abstract was not available to check against; the schedule
above is the authors' released code's ``fed_train``.

``learner: {name: fedbfpt, rounds: I, local_layers: L_k}`` with ``peft.method: full``
(``model.task: masked_lm`` is the paper's). ``rounds`` must equal the run's ``rounds``
(the learner does not see the experiment; checked at config time). The learner lives with
the adaptability techniques (``personalize/``).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.core.types import Instruction, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.local import delta_update
from fedfm.learners.loop import train_loop
from fedfm.peft.layer_stack import kept_layers, layer_stack
from fedfm.peft.state import set_state

WHO = "learner fedbfpt"


class FedBFPTParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rounds: int = Field(ge=1, description="I, the rounds the progressive schedule spreads over: the run's rounds")
    local_layers: int | None = Field(
        None, ge=1, description="L_k, transformer layers of each client's local model (default: half the global model's, at least 1)"
    )


def layer_schedule(total: int) -> list[int]:
    """The trained layer index l of rounds 1..``total`` (the authors' ``fed_train``)."""
    out, layer, remain = [], 0, total
    for i in range(total):
        if i == total - remain // 2:
            layer += 1
            remain = total - i
        out.append(layer)
    return out


def current_layer(rnd: int, total: int, local: int) -> int:
    """l in round ``rnd`` (1-based), below ``local``; rounds past ``total`` keep the last."""
    sched = layer_schedule(total)
    return min(sched[min(max(rnd, 1), total) - 1], local - 1)


def local_layers(layer: int, local: int, num_layers: int, generator: torch.Generator) -> list[int]:
    """Global layer indices of the local model: 0..layer, then ``local - layer - 1`` draws,
    uniform with replacement over ``layer+1 .. num_layers-1``, sorted (none when no deeper layer)."""
    keep = list(range(layer + 1))
    k = local - layer - 1
    if k <= 0 or layer + 1 >= num_layers:
        return keep
    drawn = torch.randint(layer + 1, num_layers, (k,), generator=generator)
    return keep + sorted(drawn.tolist())


def embedding_params(model: torch.nn.Module) -> set[int]:
    """ids of the embedding parameters: every nn.Embedding's, and every parameter under a
    module named ``*embeddings`` / ``embed_*`` (BERT's embedding LayerNorm)."""
    ids = set()
    for name, module in model.named_modules():
        last = name.split(".")[-1]
        if isinstance(module, torch.nn.Embedding) or last.endswith("embeddings") or last.startswith("embed_"):
            ids.update(id(p) for p in module.parameters())
    return ids


def trained_params(model: torch.nn.Module, full: torch.nn.ModuleList, layer: int) -> set[int]:
    """ids of what a client trains: layer ``layer`` and the output layer (trainable
    parameters outside the layer stack and the embeddings)."""
    stack = {id(p) for p in full.parameters()}
    emb = embedding_params(model)
    out = {id(p) for p in model.parameters() if p.requires_grad and id(p) not in stack and id(p) not in emb}
    return out | {id(p) for p in full[layer].parameters() if p.requires_grad}


class FedBFPTLearner:
    def __init__(self, params: FedBFPTParams):
        self.p = params

    def plan(self, rnd: int, num_layers: int, generator: torch.Generator) -> tuple[int, list[int]]:
        """(trained layer, the local model's global layer indices) of round ``rnd``."""
        local = self.p.local_layers if self.p.local_layers is not None else max(1, num_layers // 2)
        if local > num_layers:
            raise ValueError(f"learner fedbfpt: local_layers {local} exceeds the model's {num_layers} transformer layers")
        layer = current_layer(rnd, self.p.rounds, local)
        return layer, local_layers(layer, local, num_layers, generator)

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        set_state(ctx.model, instruction.state)
        _, _, full = layer_stack(ctx.model, WHO)
        layer, keep = self.plan(instruction.round, len(full), torch.Generator().manual_seed(ctx.seed))
        with kept_layers(ctx.model, keep, trained_params(ctx.model, full, layer), WHO):
            metrics = train_loop(ctx)
        update = delta_update(instruction, ctx, metrics)
        update.metrics = {**update.metrics, "layer": float(layer), "local_layers": float(len(keep))}
        return update


def fedbfpt_config_problem(exp) -> str | None:
    if exp.learner.name != "fedbfpt":
        return None
    rounds = exp.learner.params().get("rounds")
    if rounds != exp.rounds:
        return (f"learner fedbfpt: rounds {rounds} differs from the run's rounds {exp.rounds}: the progressive "
                f"schedule spreads over the run's rounds; set learner.rounds to {exp.rounds}")
    if exp.peft.method != "full":
        return f"learner fedbfpt trains whole transformer layers: use peft.method full (not {exp.peft.method})"
    local = exp.learner.params().get("local_layers")
    layers = configured_layers(exp.model) if local is not None else None
    if layers is not None and local > layers:
        return (f"learner fedbfpt: local_layers {local} exceeds the model's {layers} transformer layers "
                "(num_hidden_layers of its config.json and model.config_overrides)")
    return None


def configured_layers(model_cfg) -> int | None:
    """``num_hidden_layers`` of the model's config.json with ``model.config_overrides``
    applied (no weights read), or None where the config cannot be read here: the client
    then refuses ``local_layers`` against the loaded model (``FedBFPTLearner.plan``)."""
    from fedfm.tasks.limits import configured_model

    try:
        config, _ = configured_model(model_cfg)
    except (OSError, ValueError, KeyError, ImportError):
        return None
    layers = getattr(config, "num_hidden_layers", None)
    return layers if isinstance(layers, int) else None


register_learner("fedbfpt", FedBFPTLearner, FedBFPTParams)
