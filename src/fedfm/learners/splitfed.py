"""SplitFed over the round's exchange phases: learner and exchange ``splitfed``.

Implements SplitFed-V1 with label sharing (Thapa et al. 2022, "SplitFed: When Federated
Learning Meets Split Learning", AAAI, Algorithm 1; the split step of Vepakomma et al.
2018) with several cut points by capacity: FedSplitX-inspired (Shin et al. 2023; several
cut points; no auxiliary networks or local loss at the partition points). FedBERT-inspired
in the same sense as learner ``split`` (Tian et al. 2022; FedBERT's U-shape, embeddings
and head on the client, is not implemented: see ``learners/split.py``). Each step's
message up is ``split.smashed_data``, the same as learner ``split`` sends. Unlike learner
``split`` (``learners/split.py``: the server half runs inside the client function), here
every split step is a real message exchange of the round loop, so it runs identically on
every transport and its bytes are counted by the loop (``phase_bytes``). One round:

    train        server -> client: the client-side weights at its cut (downlink chain);
                 client: keeps them in its store; replies an empty update
    splitfed.1   client: forward of batch 1 up to the cut -> activations h_1 (B, T, H)
                 float32, attention mask (B, T) uint8, labels (B,) int64
                 server: its copy of the client's server side: forward, loss, backward,
                 optimizer step -> dL/dh_1
    splitfed.k   server -> client: dL/dh_{k-1} (B, T, H); client: backward of step k-1,
                 optimizer step, forward of batch k -> h_k ...; server as above
    splitfed.S+1 server -> client: dL/dh_S; client: backward, step, replies its
                 client-side delta; the phase's ``transform`` joins it with the server
                 copy's delta, so the rule averages both halves (SplitFed-V1)

``S`` is a client's local steps: ``min(steps, train.steps or epochs x batches)``; the
exchange has ``steps + 1`` phases (the protocol's phases are fixed per run), and a client
with fewer steps ends earlier and skips the rest. Every message is answered from the
client store alone (client-side weights, optimizer state, the global reference): the
client recomputes the forward of step k-1 with the same dropout seed before its backward,
instead of holding an autograd graph between messages (one extra client forward per step;
the same gradients, and a client process may restart between messages).

Not implemented: SplitFed-V2/V3 (one shared server-side model trained sequentially);
the U-shaped variant without label sharing; codec chains on the activations (they travel
serialized, lossless; learner ``split`` has ``act_codecs``); the client-side delta travels
in the last phase, not through ``codecs.up``, and client middleware is refused at config
time (its ``after_train`` would only see the empty train reply). Only BERT-family
sequence classifiers (``learners/split.py``). The server half reads the server's
workbench and state from the phases' ``round_state`` (the round loop puts them there).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators.splitfed import client_names, cut_of
from fedfm.core.exchanges import register_exchange
from fedfm.core.protocols import ExchangePhaseBase
from fedfm.core.seeding import derive_seed
from fedfm.core.types import MODEL, Instruction, State, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.loop import batches, make_optimizer, planned_steps
from fedfm.learners.split import bert_parts, client_forward, client_side, payload_size, smashed_data
from fedfm.learners.splitfed_server import ServerHalf
from fedfm.peft.layer_stack import stack_size
from fedfm.peft.state import trainable_names

KEY = "splitfed"  # the client store entry of the round's client-side state
CLIENT_TAG = 0x5F4  # dropout stream of the client half's steps


def wire_size(meta: dict[str, str], tensors: State) -> int:
    """Bytes of one phase message as the loop serializes and counts it."""
    return payload_size(tensors, meta)


def batch_items(examples: list, cfg, seed: int, step: int) -> list:
    """The examples of local step ``step`` (1-based): the same seeded batch order as the
    training loop (``learners/loop.py``), epoch after epoch."""
    gen = torch.Generator().manual_seed(seed)
    k = 0
    while True:
        for items in batches(examples, cfg.batch_size, gen):
            k += 1
            if k == step:
                return items


def client_steps(num_examples: int, cfg, cap: int) -> int:
    return min(cap, planned_steps(num_examples, cfg)) if num_examples else 0


# -- client side ------------------------------------------------------------------------


class SplitFedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitFedLearner:
    """The train phase of a SplitFed round: keep the client-side weights, reply nothing."""

    def __init__(self, params: SplitFedParams | None = None):
        self.params = params

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        cut = int(instruction.config["cut"])
        layers = len(bert_parts(ctx.model).layers)
        if not 1 <= cut <= layers:
            raise ValueError(f"client {ctx.cid}: cut {cut} is outside 1..{layers} layers")
        expected = sorted(n for n in trainable_names(ctx.model) if client_side(n, cut))
        if sorted(instruction.state) != expected:
            raise ValueError(f"client {ctx.cid}: received {len(instruction.state)} client-side tensors, expected {len(expected)} at cut {cut}")
        state = {f"w/{n}": t for n, t in instruction.state.items()}
        state.update({f"g/{n}": t.clone() for n, t in instruction.state.items()})
        state["meta/cut"] = torch.tensor([cut])
        ctx.store.put(ctx.cid, KEY, state)
        metrics = {"bytes_down": float(payload_size(instruction.state)), "split_cut": float(cut)}
        return Update(cid=ctx.cid, payload={}, num_examples=len(ctx.examples), metrics=metrics)


register_learner("splitfed", SplitFedLearner, SplitFedParams)


def _load(env, cid: int, ctx) -> tuple[int, list, torch.optim.Optimizer, State]:
    saved = env.store.get(cid, KEY)
    if saved is None:
        raise ValueError(f"client {cid}: a splitfed step without this round's client-side weights (train phase)")
    cut = int(saved["meta/cut"][0])
    named = [(n, p) for n, p in ctx.model.named_parameters() if p.requires_grad and client_side(n, cut)]
    with torch.no_grad():
        for n, p in named:
            p.copy_(saved[f"w/{n}"])
    opt = make_optimizer([p for _, p in named], ctx.train)
    moments = {k: v for k, v in saved.items() if k.startswith("opt/")}
    if moments:
        sd = opt.state_dict()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, t in moments.items():
            _, idx, slot = key.split("/", 2)
            state.setdefault(int(idx), {})[slot] = t
        sd["state"] = state
        opt.load_state_dict(sd)
    return cut, named, opt, saved


def _save(env, cid: int, cut: int, named: list, opt: torch.optim.Optimizer, saved: State) -> None:
    state = {k: v for k, v in saved.items() if k.startswith("g/")}
    state.update({f"w/{n}": p.detach() for n, p in named})
    state["meta/cut"] = torch.tensor([cut])
    for idx, slots in opt.state_dict()["state"].items():
        state.update({f"opt/{idx}/{s}": t for s, t in slots.items() if isinstance(t, torch.Tensor)})
    env.store.put(cid, KEY, state)


def client_message(env, cid: int, rnd: int, meta: dict[str, str], tensors: State) -> tuple[dict[str, str], State]:
    """One SplitFed message on the client: backward of the previous step (when a gradient
    came), then the next forward (``op: step``) or the client-side delta (``op: end``)."""
    t0 = time.perf_counter()
    op, k = meta["op"], int(meta["step"])
    ctx = env.wb.context(cid, rnd, store=env.store)
    cut, named, opt, saved = _load(env, cid, ctx)
    parts = bert_parts(ctx.model)
    ctx.model.train()
    try:
        if "grad" in tensors:  # backward of step k-1: recompute its forward, same dropout
            batch = ctx.task.collate(batch_items(ctx.examples, ctx.train, ctx.seed, k - 1), ctx.tokenizer)
            torch.manual_seed(derive_seed(ctx.seed, k - 1, CLIENT_TAG))
            opt.zero_grad(set_to_none=True)
            h = client_forward(parts, batch, cut)
            if tuple(tensors["grad"].shape) != tuple(h.shape):
                raise ValueError(f"client {cid}: gradient of shape {tuple(tensors['grad'].shape)} for activations {tuple(h.shape)}")
            h.backward(tensors["grad"].to(h.dtype))
            if ctx.train.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for _, p in named], ctx.train.max_grad_norm)
            opt.step()
        if op == "step":
            batch = ctx.task.collate(batch_items(ctx.examples, ctx.train, ctx.seed, k), ctx.tokenizer)
            torch.manual_seed(derive_seed(ctx.seed, k, CLIENT_TAG))
            with torch.no_grad():
                h = client_forward(parts, batch, cut)  # (B, T, H)
            _save(env, cid, cut, named, opt, saved)
            out = smashed_data(h.float(), batch)
        elif op == "end":
            out = {n: p.detach().float() - saved[f"g/{n}"].float() for n, p in named}
            env.store.delete(cid, KEY)
        else:
            raise ValueError(f"client {cid}: unknown splitfed op '{op}'")
    finally:
        ctx.model.eval()
    return {"client_s": format(time.perf_counter() - t0, ".6e")}, out  # fixed width: the same bytes every run


# -- the exchange phases (server side in messages/receive/transform) ---------------------


@dataclass
class RoundSplit:
    """The server's SplitFed bookkeeping of one round attempt (in ``round_state``)."""

    half: ServerHalf
    steps: dict[int, int]
    grads: dict[int, torch.Tensor] = field(default_factory=dict)
    deltas: dict[int, State] = field(default_factory=dict)
    sent: dict[int, str] = field(default_factory=dict)
    waiting: list[int] = field(default_factory=list)
    act_up: dict[int, int] = field(default_factory=dict)  # activation messages, bytes
    grad_down: dict[int, int] = field(default_factory=dict)  # gradient messages, bytes
    delta_up: dict[int, int] = field(default_factory=dict)  # the client-side delta reply, bytes
    ask_down: dict[int, int] = field(default_factory=dict)  # requests without a gradient (phase 1), bytes
    client_s: dict[int, float] = field(default_factory=dict)


def server_context(round_state: dict) -> tuple[Any, dict]:
    """The server's workbench and the round's server state (the round loop puts both in
    every phase's ``round_state``)."""
    return round_state["workbench"], round_state["server_state"]


def _add(d: dict[int, int], cid: int, n: int) -> None:
    d[cid] = d.get(cid, 0) + n


class SplitFedPhase(ExchangePhaseBase):
    """Phase ``splitfed.<k>``: the k-th activation/gradient exchange of every client."""

    when = "after_train"

    def __init__(self, k: int, steps: int):
        self.k, self.steps, self.name = k, steps, f"splitfed.{k}"

    def _start(self, rnd: int, participants: list[int], round_state: dict) -> RoundSplit:
        wb, server_state = server_context(round_state)
        model = server_state[MODEL]
        half = ServerHalf(wb, model, wb.exp.seed, rnd)
        steps = {}
        for cid in participants:
            half.open(cid, cut_of(wb.clients[cid].profile, stack_size(wb.model, "learner splitfed"), cid))
            steps[cid] = client_steps(len(wb.clients[cid].indices), wb.exp.train, self.steps)
        return RoundSplit(half, steps)

    def messages(self, rnd: int, participants: list[int], round_state: dict) -> dict[int, tuple[dict[str, str], State]]:
        if self.k == 1:
            round_state[KEY] = self._start(rnd, participants, round_state)
        st: RoundSplit = round_state[KEY]
        st.sent, st.waiting, out = {}, [], {}
        for cid in participants:
            total = st.steps[cid]
            if self.k > total + 1:
                st.waiting.append(cid)  # finished in an earlier phase
                continue
            op = "step" if self.k <= total else "end"
            tensors = {"grad": st.grads.pop(cid)} if self.k > 1 else {}
            meta = {"op": op, "step": str(self.k)}
            _add(st.grad_down if tensors else st.ask_down, cid, wire_size(meta, tensors))
            st.sent[cid] = op
            out[cid] = (meta, tensors)
        return out

    def client(self, env, cid: int, rnd: int, meta: dict[str, str], tensors: State) -> tuple[dict[str, str], State]:
        return client_message(env, cid, rnd, meta, tensors)

    def receive(self, rnd: int, replies: dict[int, tuple[dict[str, str], State]], round_state: dict) -> list[int]:
        st: RoundSplit = round_state[KEY]
        wb, server_state = server_context(round_state)
        hidden = wb.model.config.hidden_size
        going_on = list(st.waiting)
        for cid, (meta, tensors) in sorted(replies.items()):
            st.client_s[cid] = st.client_s.get(cid, 0.0) + float(meta.get("client_s", 0.0))
            size = wire_size(meta, tensors)
            if st.sent.get(cid) == "step":
                h, mask, labels = tensors.get("h"), tensors.get("mask"), tensors.get("labels")
                if h is None or mask is None or labels is None or h.dim() != 3 or h.shape[2] != hidden \
                        or tuple(mask.shape) != tuple(h.shape[:2]) or tuple(labels.shape) != (h.shape[0],) \
                        or not torch.isfinite(h).all():
                    continue  # refused: recorded by the loop as failed in this phase
                _add(st.act_up, cid, size)
                st.grads[cid] = st.half.step(cid, self.k, h, mask, labels)
            else:
                copy = st.half.copies[cid]
                expected = client_names(server_state[MODEL], copy.cut)
                model = server_state[MODEL]
                if sorted(tensors) != sorted(expected) or any(tuple(tensors[n].shape) != tuple(model[n].shape) for n in expected) \
                        or not all(torch.isfinite(t).all() for t in tensors.values()):
                    continue
                _add(st.delta_up, cid, size)
                st.deltas[cid] = dict(tensors)
            going_on.append(cid)
        return sorted(going_on)

    def transform(self, updates: list[Update], round_state: dict) -> list[Update]:
        if self.k != self.steps + 1:
            return updates
        st: RoundSplit = round_state[KEY]
        out = []
        for u in updates:
            if u.cid not in st.deltas:
                continue
            copy = st.half.copies[u.cid]
            steps = st.steps[u.cid]
            up = st.act_up.get(u.cid, 0)
            down = st.grad_down.get(u.cid, 0)
            delta_up = st.delta_up.get(u.cid, 0)
            ask = st.ask_down.get(u.cid, 0)
            metrics = {
                **u.metrics,
                "train_loss": sum(copy.losses) / max(len(copy.losses), 1),
                "steps": float(steps),
                "step_s": st.client_s.get(u.cid, 0.0) / max(steps, 1),
                "server_s": copy.seconds,
                "split_bytes_up": float(up),
                "split_bytes_down": float(down),
                "wire_bytes_up": float(up + delta_up),
                "wire_bytes_down": float(u.metrics.get("bytes_down", 0.0) + down + ask),
            }
            out.append(replace(u, payload={**st.deltas[u.cid], **st.half.delta(u.cid)}, metrics=metrics))
        return out


class SplitFedExchangeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(..., ge=1, description="local split steps per round (one exchange each); a client with fewer planned steps stops earlier")


def splitfed_phases(params: SplitFedExchangeParams) -> list[SplitFedPhase]:
    return [SplitFedPhase(k, params.steps) for k in range(1, params.steps + 2)]


register_exchange("splitfed", splitfed_phases, SplitFedExchangeParams)

__all__ = ["SplitFedLearner", "SplitFedPhase", "batch_items", "client_message", "splitfed_phases", "wire_size"]
