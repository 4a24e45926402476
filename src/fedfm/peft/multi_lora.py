"""Several clients' LoRA adapters in one forward pass: each example carries its client's
adapter index (multi-adapter batching in the spirit of S-LoRA, Sheng et al. 2024,
"S-LoRA: Serving Thousands of Concurrent LoRA Adapters", and Punica, Chen et al. 2024,
"Punica: Multi-Tenant LoRA Serving"), for TRAINING as well as inference.

``AdapterBatch(model, names)`` is a context manager over a peft LoRA model. Inside it,
every peft LoRA ``Linear`` layer and every trainable ``nn.Linear`` outside the LoRA
factors (the task head peft keeps in ``modules_to_save``, e.g. BERT's ``classifier``)
compute their trainable part PER EXAMPLE from tensors given with ``bind(states, idx)``:

- ``states``: one ``{name: tensor}`` per adapter (the same trainable names as the model's
  State; the tensors may require grad, and gradients flow to them, never to the model);
- ``idx``: ``(N,)`` long tensor, example ``n`` of the batch uses ``states[idx[n]]``.

For a LoRA layer with frozen weight ``W`` and factors ``A_k (r, in)``, ``B_k (out, r)``:
``y[n] = x[n] @ W^T + scale * (dropout(x[n]) @ A[idx[n]]^T) @ B[idx[n]]^T``; a trainable
head ``Linear``: ``y[n] = x[n] @ W[idx[n]]^T + b[idx[n]]``. The frozen base model runs once
on the whole batch. Two ways to compute the per-example terms, picked by ``idx``:

- examples grouped by adapter (``idx`` non-decreasing, as ``learners/multi_lora.py``
  builds its batches): one pair of matmuls per adapter on its contiguous segment of the
  batch (``F.linear`` on a slice, the same ops as peft's own forward), concatenated: the
  segmented form of Punica's SGMV kernel, without copies of the weights;
- grouped, every adapter with the same number of examples, and ``kernel="stacked"``: the
  ``K`` adapters' tensors stacked to ``(K, r, in)`` / ``(K, out, r)`` and the batch viewed
  as ``(K, m * L, in)``: two ``torch.bmm`` per layer whatever ``K`` (the kernel launches
  of the segmented form grow with ``K``; this is the form for a launch-bound GPU step);
- any other ``idx``: the stacked tensors gathered per example (``index_select``) and
  applied with batched matmuls (``torch.bmm``).

``kernel`` (``runtime.batch_kernel``): ``segments`` (default here) or ``stacked``; the two
give the same values up to float rounding (bmm against linear; tested).

Outside the context the model is the plain peft model again.

Written here rather than taken from peft: peft's mixed-adapter batches
(``model(..., adapter_names=[...])``) refuse training mode ("Cannot pass `adapter_names`
when the model is in training mode") and need one named adapter per client inside the
model, which would change the model's trainable State; Punica's and S-LoRA's kernels are
CUDA-only serving kernels. This is the plain-torch gather + bmm form (no custom kernel).

Supported: peft LoRA ``Linear`` layers (vanilla LoRA: no DoRA or other variant, the one
adapter ``default``) whose input has the batch first, and trainable ``nn.Linear`` heads.
Any other trainable parameter raises ``NotImplementedError`` naming it.
"""

from __future__ import annotations

import types
from typing import Sequence

import torch
import torch.nn.functional as F

ADAPTER = "default"
KERNELS = ("segments", "stacked")


def gather_linear(x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example linear map: ``x (N, ..., in)``, ``weight (K, out, in)``, ``bias (K, out)``,
    ``idx (N,)`` -> ``(N, ..., out)`` with ``y[n] = x[n] @ weight[idx[n]]^T + bias[idx[n]]``."""
    n = x.shape[0]
    if idx.shape[0] != n:
        raise RuntimeError(f"batched adapters: the input's first dimension ({n}) is not the batch of {idx.shape[0]} examples")
    flat = x.reshape(n, -1, x.shape[-1])  # (N, L, in)
    w = weight.index_select(0, idx)  # (N, out, in)
    y = torch.bmm(flat, w.transpose(1, 2))  # (N, L, out)
    if bias is not None:
        y = y + bias.index_select(0, idx).unsqueeze(1)
    return y.reshape(*x.shape[:-1], weight.shape[1])


def segments_of(idx: torch.Tensor, k: int) -> list[tuple[int, int]] | None:
    """``[(start, end)]`` of adapter ``0..k-1`` when ``idx`` holds each adapter's examples
    contiguously and in order (every adapter at least once); None otherwise."""
    values = idx.tolist()
    bounds, start = [], 0
    for a in range(k):
        end = start
        while end < len(values) and values[end] == a:
            end += 1
        if end == start:
            return None
        bounds.append((start, end))
        start = end
    return bounds if start == len(values) else None


def stacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (K * m, ..., in)`` grouped by adapter, ``m`` examples each; ``weight (K, out, in)``,
    ``bias (K, out)`` -> ``(K * m, ..., out)``: adapter ``k``'s map on rows ``k*m:(k+1)*m``,
    one ``bmm`` for every adapter."""
    k = weight.shape[0]
    flat = x.reshape(k, -1, x.shape[-1])  # (K, m * L, in): example-major rows, so adapter k's rows are block k
    y = torch.bmm(flat, weight.transpose(1, 2)) if bias is None else torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
    return y.reshape(*x.shape[:-1], weight.shape[1])


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, scale: float) -> torch.Tensor:
    """The per-example LoRA term ``scale * (x[n] @ a[idx[n]]^T) @ b[idx[n]]^T`` for
    ``x (N, ..., in)``, ``a (K, r, in)``, ``b (K, out, r)``, ``idx (N,)``."""
    return gather_linear(gather_linear(x, a, idx), b, idx) * scale


class AdapterBatch:
    """Patch ``model``'s LoRA layers and trainable heads to per-example adapters (see module doc)."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str]):
        self.model = model
        self.names = list(names)
        modules = dict(model.named_modules())
        self.lora: dict[str, tuple[str, str]] = {}  # module name -> (A name, B name)
        self.heads: dict[str, tuple[str, str | None]] = {}  # module name -> (weight name, bias name)
        for name in self.names:
            owner, _, leaf = name.rpartition(".")
            for part in (f".lora_A.{ADAPTER}", f".lora_B.{ADAPTER}"):
                if owner.endswith(part) and leaf == "weight":
                    layer = owner[: -len(part)]
                    self._check_lora(layer, modules.get(layer), name)
                    self.lora[layer] = (f"{layer}.lora_A.{ADAPTER}.weight", f"{layer}.lora_B.{ADAPTER}.weight")
                    break
            else:
                mod = modules.get(owner)
                if type(mod) is not torch.nn.Linear or leaf not in ("weight", "bias"):
                    raise NotImplementedError(
                        f"batched adapters: trainable parameter '{name}' is neither a LoRA factor nor an nn.Linear "
                        "weight or bias; runtime.transport: batched supports LoRA layers and linear heads only"
                    )
                self.heads[owner] = (f"{owner}.weight", f"{owner}.bias" if mod.bias is not None else None)
        missing = [n for pair in self.lora.values() for n in pair if n not in self.names]
        missing += [n for pair in self.heads.values() for n in pair if n is not None and n not in self.names]
        if missing:
            raise NotImplementedError(f"batched adapters: {missing} are frozen while their partner is trained")
        self.modules = modules
        self.states: list[dict[str, torch.Tensor]] = []
        self.stacked: dict[str, torch.Tensor] = {}
        self.idx: torch.Tensor | None = None
        self.bounds: list[tuple[int, int]] | None = None
        self.uniform = False

    @staticmethod
    def _check_lora(layer: str, mod, name: str) -> None:
        from peft.tuners.lora.layer import Linear

        if not isinstance(mod, Linear):
            raise NotImplementedError(f"batched adapters: '{name}' belongs to {type(mod).__name__}, not a peft LoRA Linear layer")
        if getattr(mod, "lora_variant", {}) or list(mod.active_adapters) != [ADAPTER]:
            raise NotImplementedError(f"batched adapters: layer '{layer}' uses a LoRA variant or several adapters (vanilla LoRA only)")

    def bind(self, states: Sequence[dict[str, torch.Tensor]], idx: torch.Tensor,
             bounds: Sequence[tuple[int, int]] | None = None, kernel: str = "segments",
             stacked: dict[str, torch.Tensor] | None = None) -> None:
        """The adapters of the next forward: ``states[k]`` serves the examples with ``idx == k``.
        ``bounds``: each adapter's ``(start, end)`` when the caller knows the examples are
        grouped (saves reading ``idx`` back from the device); else found from ``idx``.
        ``kernel``: ``segments`` or ``stacked`` (module doc). ``stacked``: the states
        already stacked, ``{name: (K, *shape)}`` with row ``k`` = ``states[k][name]`` (the
        ``stacked`` kernel then uses them as they are)."""
        if not states:
            raise ValueError("batched adapters: no adapter given")
        if kernel not in KERNELS:
            raise ValueError(f"batched adapters: kernel must be one of {list(KERNELS)}, got '{kernel}'")
        self.states, self.idx = list(states), idx
        self.bounds = list(bounds) if bounds is not None else segments_of(idx, len(self.states))
        sizes = {e - s for s, e in self.bounds} if self.bounds is not None else set()
        self.uniform = kernel == "stacked" and len(sizes) == 1
        need = self.bounds is None or self.uniform
        if stacked is not None and need and any(stacked[n].shape[0] != len(self.states) for n in self.names):
            raise ValueError(f"batched adapters: the stacked states do not hold {len(self.states)} adapters")
        if stacked is not None and need:
            self.stacked = {n: stacked[n] for n in self.names}
        else:
            self.stacked = {n: torch.stack([s[n] for s in states]) for n in self.names} if need else {}  # (K, *shape)

    def check(self, x: torch.Tensor, where: str) -> None:
        if self.idx is None:
            raise RuntimeError("batched adapters: bind(states, idx) before the forward pass")
        if x.shape[0] != self.idx.shape[0]:
            raise RuntimeError(f"batched adapters: the input of '{where}' has first dimension {x.shape[0]}, "
                               f"not the batch of {self.idx.shape[0]} examples")

    def _lora_forward(self, mod, a_name: str, b_name: str, layer_name: str):
        batch = self

        def forward(_self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            batch.check(x, layer_name)
            result = mod.base_layer(x, *args, **kwargs)
            scale = mod.scaling[ADAPTER]
            h = mod.lora_dropout[ADAPTER](x)
            if batch.uniform:
                a, b = batch.stacked[a_name], batch.stacked[b_name]
                return result + (stacked_linear(stacked_linear(h.to(a.dtype), a), b) * scale).to(result.dtype)
            if batch.bounds is None:
                a, b = batch.stacked[a_name], batch.stacked[b_name]
                return result + lora_delta(h.to(a.dtype), a, b, batch.idx, scale).to(result.dtype)
            parts = [F.linear(F.linear(h[s:e].to(st[a_name].dtype), st[a_name]), st[b_name]) * scale
                     for (s, e), st in zip(batch.bounds, batch.states)]
            return result + torch.cat(parts).to(result.dtype)

        return forward

    def _head_forward(self, w_name: str, b_name: str | None, owner: str):
        batch = self

        def forward(_self, x: torch.Tensor) -> torch.Tensor:
            batch.check(x, owner)
            if batch.uniform:
                return stacked_linear(x, batch.stacked[w_name], batch.stacked[b_name] if b_name is not None else None)
            if batch.bounds is None:
                bias = batch.stacked[b_name] if b_name is not None else None
                return gather_linear(x, batch.stacked[w_name], batch.idx, bias)
            return torch.cat([F.linear(x[s:e], st[w_name], st[b_name] if b_name is not None else None)
                              for (s, e), st in zip(batch.bounds, batch.states)])

        return forward

    def __enter__(self) -> "AdapterBatch":
        for layer, (a, b) in self.lora.items():
            mod = self.modules[layer]
            mod.forward = types.MethodType(self._lora_forward(mod, a, b, layer), mod)
        for owner, (w, b) in self.heads.items():
            mod = self.modules[owner]
            mod.forward = types.MethodType(self._head_forward(w, b, owner), mod)
        return self

    def __exit__(self, *exc) -> None:
        for name in [*self.lora, *self.heads]:
            self.modules[name].__dict__.pop("forward", None)  # back to the class's forward
        self.states, self.stacked, self.idx, self.bounds, self.uniform = [], {}, None, None, False
