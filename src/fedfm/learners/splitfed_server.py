"""The main server's half of SplitFed-V1 (Thapa et al. 2022; see ``learners/splitfed.py``).

``ServerHalf`` is the main server's per-client state within one round attempt: the copy
of the server-side trainable tensors (leaves its own optimizer owns) and that optimizer,
run through ``torch.func.functional_call`` on the server's one base model, so the copies
never touch the model's own weights. Gradient-norm clipping (``train.max_grad_norm``) is
applied to each half separately, as two machines that never see each other's gradients
must. It lives with the learners because it trains (the optimizer and the split model
parts are theirs); its server part is ``aggregators/splitfed.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fedfm.aggregators.splitfed import server_names
from fedfm.core.seeding import derive_seed
from fedfm.core.types import State
from fedfm.learners.loop import make_optimizer
from fedfm.learners.split import bert_parts, server_batch, server_loss

SERVER_TAG = 0x5F5  # dropout stream of the server half's steps


class _Top(torch.nn.Module):
    """The server-side part as a module, so ``functional_call`` can swap in a copy."""

    def __init__(self, model: torch.nn.Module, cut: int):
        super().__init__()
        self.model, self.cut = model, cut

    def forward(self, h: torch.Tensor, batch: dict) -> torch.Tensor:
        return server_loss(bert_parts(self.model), h, batch, self.cut)


@dataclass
class ServerCopy:
    """The main server's copy of one client's server-side part during a round."""

    cut: int
    global_state: State
    leaves: dict[str, torch.Tensor]
    opt: torch.optim.Optimizer
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


class ServerHalf:
    """Per-client server-side copies of one round attempt, on the server's base model."""

    def __init__(self, workbench, model_state: State, seed: int, rnd: int):
        self.wb, self.model_state, self.seed, self.rnd = workbench, model_state, seed, rnd
        self.copies: dict[int, ServerCopy] = {}

    def open(self, cid: int, cut: int) -> ServerCopy:
        names = server_names(self.model_state, cut)
        leaves = {n: self.model_state[n].detach().clone().float().requires_grad_(True) for n in names}
        opt = make_optimizer(list(leaves.values()), self.wb.exp.train)
        self.copies[cid] = ServerCopy(cut, {n: self.model_state[n] for n in names}, leaves, opt)
        return self.copies[cid]

    def step(self, cid: int, step: int, h: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One server step on client ``cid``'s activations ``h`` (B, T, H): its copy takes an
        optimizer step; returns dL/dh (B, T, H)."""
        copy = self.copies[cid]
        t0 = time.perf_counter()
        model = self.wb.model
        was_training = model.training
        model.train()
        torch.manual_seed(derive_seed(self.seed, self.rnd, cid, step, SERVER_TAG))  # the top part's dropout
        h_leaf = h.detach().float().requires_grad_(True)
        batch = server_batch({"mask": mask, "labels": labels})
        params = {f"model.{n}": t for n, t in copy.leaves.items()}
        copy.opt.zero_grad(set_to_none=True)
        loss = torch.func.functional_call(_Top(model, copy.cut), params, (h_leaf, batch))
        loss.backward()
        clip = self.wb.exp.train.max_grad_norm
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(copy.leaves.values()), clip)
        copy.opt.step()
        model.train(was_training)
        copy.losses.append(float(loss.detach()))
        copy.seconds += time.perf_counter() - t0
        return h_leaf.grad.detach()

    def delta(self, cid: int) -> State:
        copy = self.copies[cid]
        return {n: copy.leaves[n].detach() - copy.global_state[n].float() for n in copy.leaves}


__all__ = ["ServerCopy", "ServerHalf"]
