"""Split learning of an encoder classifier as in SplitFed-V1 with label sharing (Thapa et al.
2022, "SplitFed: When Federated Learning Meets Split Learning"), with several cut points by
client tier: FedSplitX-inspired (Shin et al. 2023, "FedSplitX: Federated Split Learning for
Computationally-Constrained Heterogeneous Clients"; several cut points; no auxiliary
networks: FedSplitX also attaches an auxiliary network at each partition point and trains
with a local loss beside the collaborative one, neither of which is here). FedBERT-inspired
(Tian et al. 2022, "FedBERT: When Federated Learning Meets Pre-training": split learning of
BERT across clients), with differences: FedBERT pre-trains BERT and keeps the embedding
layer and the head on the client with the Transformer layers on the server (a U-shape, the
labels never leave the client); here a classifier is fine-tuned and the model is cut once,
so the head sits on the server and the labels travel with the activations.

The client holds the embeddings and the first ``cut`` transformer layers with their PEFT
state; the server holds the other layers, the pooler and the head. One split step:

    client: h = layers[:cut](embeddings(x))              -> h, attention mask, labels up
    server: loss = CE(head(pool(layers[cut:](h))), y); backward -> dL/dh down
    client: h.backward(dL/dh)

What goes up is ``smashed_data``, the same message as ``splitfed``'s: the activations h
(B, T, H), the attention mask (B, T) as uint8 and the labels (B,) int64; the server half
computes with what it decoded only (``server_batch``). The message and the gradient each go
through a codec chain (``act_codecs`` up, ``grad_codecs`` down, the framework's own stages,
which act on float tensors only: a lossy stage changes h or its gradient, making the step
approximate exactly as on a real link, and never the mask or the labels), and the bytes
counted are ``len()`` of the serialized messages, per step and per round. With lossless
chains the gradients of every trainable tensor are those of the unsplit model
(``tests/test_hetero_split.py`` checks it to float tolerance).

What runs today is the in-process version (learner ``split``): the client function holds
the whole model, so each local step is a split step through the chains within one
process, with the bytes that would cross the link counted in the update's metrics
(``split_bytes_up``, ``split_bytes_down`` per round, ``split_cut``; ``wire_bytes_up`` /
``wire_bytes_down`` add the client-side half's weights: its delta up and the weights it
received down, each counted as one serialized payload, ``len()`` of its safetensors bytes
without the run's codec chains; the simulated clock ``sim_clock`` charges both to the
link). Both halves' deltas return to the server and are averaged by the rule
(SplitFed-V1: the client-side parts, and the server-side copies, are each averaged across
clients every round); the server-side delta would stay on the server in a deployment, so
the round's ``bytes_up`` overstates the uplink by its size. The cut is the client's
profile ``cut`` (or derived from ``capacity``, ``runtime/capacity.py``), so clients of
several tiers hold several cut points (FedSplitX-inspired: no auxiliary networks). The
version whose main server owns the upper layers and answers each step as its own exchange
over any transport is ``learners/splitfed.py`` (learner and exchange ``splitfed``). The
activation and gradient chains are the learner's own parameters (``act_codecs``,
``grad_codecs``; empty: serialization only, lossless).

Only BERT-family encoders (``bert.embeddings``, ``bert.encoder.layer``, ``bert.pooler``,
``classifier``) are supported; another model raises a ValueError naming its class. The
client half starts at ``bert.embeddings``, not at the model's own forward, so tuners that
insert a soft prompt or prefix there (prompt/prefix/P-tuning and the other prompt
methods) are refused at config time (``learners/hetero_checks.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.codecs import CodecChain, CodecContext
from fedfm.codecs.base import Payload
from fedfm.codecs.serialize import to_bytes
from fedfm.core.types import Instruction, State, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.local import delta_update
from fedfm.learners.loop import batches, make_optimizer, planned_steps
from fedfm.aggregators.splitfed import client_side  # noqa: F401  (embeddings and layers < cut)
from fedfm.peft.state import set_state
from fedfm.runtime.capacity import client_who, resolve_size


@dataclass
class BertParts:
    model: torch.nn.Module  # the sequence classifier (under any peft wrapper)
    bert: torch.nn.Module
    layers: torch.nn.ModuleList
    dropout: torch.nn.Module
    classifier: torch.nn.Module


def bert_parts(model: torch.nn.Module) -> BertParts:
    inner = model
    for attr in ("base_model", "model"):  # peft: PeftModel.base_model (LoraModel).model
        if not hasattr(inner, "bert") and hasattr(inner, attr):
            inner = getattr(inner, attr)
    if not hasattr(inner, "bert") or not hasattr(inner, "classifier"):
        raise ValueError(f"split learning supports BERT-family sequence classifiers; got {type(inner).__name__}")
    return BertParts(model, inner.bert, inner.bert.encoder.layer, inner.dropout, inner.classifier)


def attention_mask_4d(parts: BertParts, h: torch.Tensor, mask: torch.Tensor):
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=parts.bert.config, inputs_embeds=h, attention_mask=mask)


def client_forward(parts: BertParts, batch: dict, cut: int) -> torch.Tensor:
    """Embeddings and layers ``[0, cut)``: the activations sent up, (B, T, H)."""
    h = parts.bert.embeddings(input_ids=batch["input_ids"])  # (B, T, H)
    mask = attention_mask_4d(parts, h, batch["attention_mask"])
    for layer in parts.layers[:cut]:
        h = layer(h, mask)
    return h


def smashed_data(h: torch.Tensor, batch: dict) -> State:
    """What a client sends up at every split step, in both split learners: the activations
    ``h`` (B, T, H), the attention mask (B, T) as uint8 and the labels (B,) int64."""
    return {"h": h, "mask": batch["attention_mask"].to(torch.uint8), "labels": batch["labels"].to(torch.int64)}


def server_batch(received: State) -> dict:
    """The server half's batch, built from received smashed data only."""
    return {"attention_mask": received["mask"].long(), "labels": received["labels"].long()}


def server_loss(parts: BertParts, h: torch.Tensor, batch: dict, cut: int) -> torch.Tensor:
    """Layers ``[cut, L)``, the pooler and the head on received activations ``h``."""
    mask = attention_mask_4d(parts, h, batch["attention_mask"])
    for layer in parts.layers[cut:]:
        h = layer(h, mask)
    pooled = parts.bert.pooler(h)  # (B, H)
    logits = parts.classifier(parts.dropout(pooled))  # (B, C)
    return torch.nn.functional.cross_entropy(logits.float(), batch["labels"])


@dataclass
class StepResult:
    loss: float
    bytes_up: int
    bytes_down: int


def split_step(parts: BertParts, batch: dict, cut: int, up: CodecChain, down: CodecChain, rnd: int = 0, cid: int = 0, seed: int = 0) -> StepResult:
    """One split forward/backward: gradients accumulate in every trainable parameter of
    both halves (``.grad``); the smashed data crosses the up chain, its gradient the down
    chain. The bytes are those of the two serialized messages."""
    if not 1 <= cut <= len(parts.layers):
        raise ValueError(f"client {cid}: cut {cut} is outside 1..{len(parts.layers)} layers")
    h = client_forward(parts, batch, cut)  # (B, T, H)
    msg = smashed_data(h.detach(), batch)
    sent = up.encode(msg, {"cid": str(cid)}, CodecContext("up", rnd, cid, msg, seed=seed))
    received, _ = up.decode(sent.data, CodecContext("up", rnd, cid, msg, seed=seed))
    h_server = received["h"].requires_grad_(True)  # a leaf on the server
    loss = server_loss(parts, h_server, server_batch(received), cut)
    loss.backward()
    ref = {"h": h.detach()}
    back = down.encode({"h": h_server.grad}, {"cid": str(cid)}, CodecContext("down", rnd, cid, ref, seed=seed))
    grad, _ = down.decode(back.data, CodecContext("down", rnd, cid, ref, seed=seed))
    h.backward(grad["h"].to(h.dtype))
    return StepResult(float(loss.detach()), sent.nbytes, back.nbytes)


def payload_size(tensors: State, meta: dict[str, str] | None = None) -> int:
    """``len()`` of ``tensors`` (and ``meta``) serialized as one payload; 0 for nothing."""
    if not tensors and not meta:
        return 0
    return len(to_bytes(Payload(dict(tensors), {k: str(v) for k, v in (meta or {}).items()})))


def check_cuts(model: torch.nn.Module, profiles: dict[int, dict[str, Any]]) -> None:
    """Every client's ``cut`` against the model's layers, as ``local_update`` resolves it
    (``fedfm check`` runs it on the meta-device model: ``runtime/skeleton.py``)."""
    total = len(bert_parts(model).layers)
    for cid, profile in sorted(profiles.items()):
        resolve_size(profile, "cut", total, client_who(cid, profile))


class SplitParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    act_codecs: list[dict[str, Any]] = Field(default_factory=list, description="codec chain of the activations (up)")
    grad_codecs: list[dict[str, Any]] = Field(default_factory=list, description="codec chain of their gradients (down)")


class SplitLearner:
    """Local training by split steps (in-process server half); see the module docstring."""

    def __init__(self, params: SplitParams):
        self.up = CodecChain.from_specs(list(params.act_codecs), "learner.act_codecs")
        self.down = CodecChain.from_specs(list(params.grad_codecs), "learner.grad_codecs")

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        parts = bert_parts(ctx.model)
        total = len(parts.layers)
        cut = resolve_size(ctx.profile, "cut", total, client_who(ctx.cid, ctx.profile))
        up, down = self.up, self.down
        set_state(ctx.model, instruction.state)
        cfg = ctx.train
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        opt = make_optimizer(params, cfg)
        gen = torch.Generator().manual_seed(ctx.seed)
        torch.manual_seed(ctx.seed)
        steps_total = planned_steps(len(ctx.examples), cfg)
        ctx.model.train()
        step, loss_sum, b_up, b_down = 0, 0.0, 0, 0
        t0 = time.perf_counter()
        while step < steps_total:
            for items in batches(ctx.examples, cfg.batch_size, gen):
                batch = ctx.task.collate(items, ctx.tokenizer)
                opt.zero_grad(set_to_none=True)
                res = split_step(parts, batch, cut, up, down, instruction.round, ctx.cid, ctx.seed)
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                step += 1
                loss_sum += res.loss
                b_up += res.bytes_up
                b_down += res.bytes_down
                if step >= steps_total:
                    break
        ctx.model.eval()
        metrics = {
            "train_loss": loss_sum / max(step, 1),
            "steps": float(step),
            "step_s": (time.perf_counter() - t0) / max(step, 1),
            "split_cut": float(cut),
            "split_bytes_up": float(b_up),
            "split_bytes_down": float(b_down),
        }
        update = delta_update(instruction, ctx, metrics)
        sent = {n: t for n, t in update.payload.items() if client_side(n, cut)}  # the server-side half stays on the server
        received = {n: t for n, t in instruction.state.items() if client_side(n, cut)}
        update.metrics["wire_bytes_up"] = float(b_up + payload_size(sent))
        update.metrics["wire_bytes_down"] = float(b_down + payload_size(received))
        return update


register_learner("split", SplitLearner, SplitParams)
