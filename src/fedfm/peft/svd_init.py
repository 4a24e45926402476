"""LoRA initialised from an earlier run's update by its truncated SVD: SLoRA's second stage
(Babakniya et al. 2023, "SLoRA: Federated Parameter Efficient Fine-Tuning of Language
Models").

``peft: {method: lora, init: svd}`` with ``model.init_from: RUN`` (a stage chained after a
``sparse`` or other non-adapter stage, ``examples/peft/slora.yaml``). For every LoRA target
layer, with ``W0`` the weight ``RUN`` started from (the pretrained one, or what the runs
before ``RUN`` in its chain left) and ``W1`` the weight after ``RUN``:

    dW = W1 - W0 = U S V^T,    B = U_r sqrt(S_r / s),    A = sqrt(S_r / s) V_r^T

(``s = alpha / r``, LoRA's scaling, so ``s B A`` is the best rank-``r`` approximation of
``dW``), and the frozen base weight of the layer goes back to ``W0``: the run trains
``W0 + s B A`` from ``W0 + [dW]_r``, as SLoRA does. What ``dW`` has beyond rank ``r`` is
dropped (measured and reported per layer: ``relative_residual`` in the log). A rank slot
with a zero singular value (``dW`` of rank below ``r``, or a layer ``RUN`` did not change)
keeps peft's default init (``A`` random, that column of ``B`` zero): a slot with both zero
would never receive a gradient. Tensors of ``RUN`` outside the LoRA targets (the task
head, other layers) stay loaded as ``model.init_from`` loads them.

Written by hand: ``peft``'s SVD-based inits (PiSSA, OLoRA) decompose the pretrained weight
itself, not the difference to another run.
"""

from __future__ import annotations

import logging

import torch

from fedfm.peft.freezing import find_modules

log = logging.getLogger(__name__)


def svd_targets(spec) -> list[str] | None:
    """The LoRA target modules when ``spec`` asks for ``init: svd``, else None."""
    if spec.method != "lora" or spec.params().get("init", "default") != "svd":
        return None
    from fedfm.core.registry import RegistryError
    from fedfm.peft.base import tuners

    try:
        return list(tuners.parse("lora", spec.params(), "peft").target_modules)
    except RegistryError:
        return None  # the peft section's own check reports it


def svd_init_problem(exp) -> str | None:
    if exp.peft.method == "ffa_lora" and exp.peft.params().get("init", "default") == "svd":
        return ("peft.init: svd is implemented for peft.method lora only (ffa_lora would freeze A at the SVD's "
                "factor, a combination no paper describes); use method lora")
    if svd_targets(exp.peft) is not None and not exp.model.init_from:
        return ("peft.init: svd starts LoRA from the update of an earlier run, and model.init_from names none: "
                "chain this stage after another in a stages file (examples/peft/slora.yaml) or set model.init_from")
    return None


def pretrained_weights(model: torch.nn.Module, targets: list[str]) -> dict[str, torch.Tensor]:
    """A copy of every LoRA target layer's weight, taken before ``model.init_from`` loads."""
    return {name: module.weight.detach().clone() for name, module in find_modules(model, list(targets))}


def _lora_layer(model: torch.nn.Module, name: str):
    for prefix in ("base_model.model.", ""):
        try:
            return model.get_submodule(prefix + name)
        except AttributeError:
            continue
    raise RuntimeError(f"peft.init svd: no LoRA layer '{name}' in the tuned model")


def factors(delta: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, A, live): ``scaling * B @ A`` is the best rank-``r`` approximation of ``delta``
    (float64 SVD); ``live`` marks the rank slots with a non-zero singular value."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)  # (out,k) (k,) (k,in)
    k = min(r, s.numel())
    tol = s[0] * max(delta.shape) * torch.finfo(torch.float64).eps if s.numel() else 0.0
    live = torch.zeros(r, dtype=torch.bool)
    live[:k] = s[:k] > tol
    root = torch.zeros(r, dtype=torch.float64)
    root[:k] = torch.sqrt(s[:k] / scaling)
    b = torch.zeros(delta.shape[0], r, dtype=torch.float64)
    a = torch.zeros(r, delta.shape[1], dtype=torch.float64)
    b[:, :k] = u[:, :k] * root[:k]
    a[:k] = root[:k, None] * vh[:k]
    return b, a, live


def init_from_difference(model: torch.nn.Module, pretrained: dict[str, torch.Tensor], adapter: str = "default") -> dict[str, float]:
    """Set every target layer's LoRA factors from ``W1 - W0`` and its base weight back to
    ``W0`` (in place). Returns each layer's relative residual ``|dW - s B A| / |dW|``."""
    residuals: dict[str, float] = {}
    with torch.no_grad():
        for name, w0 in pretrained.items():
            layer = _lora_layer(model, name)
            base = layer.base_layer.weight
            delta = base.double() - w0.double()  # (out, in)
            lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight  # (r, in), (out, r)
            scaling = float(layer.scaling[adapter])
            b, a, live = factors(delta, lora_a.shape[0], scaling)
            lora_b[:, live] = b[:, live].to(lora_b.dtype)
            lora_a[live] = a[live].to(lora_a.dtype)
            base.copy_(w0.to(base.dtype))
            norm = float(torch.linalg.norm(delta))
            approx = scaling * lora_b.double() @ lora_a.double()  # what the model adds (dead slots: B's column is 0)
            residuals[name] = float(torch.linalg.norm(delta - approx)) / norm if norm > 0 else 0.0
    if all(float(torch.count_nonzero(_lora_layer(model, n).lora_B[adapter].weight)) == 0 for n in pretrained):
        raise ValueError(
            "peft.init: svd: model.init_from changed none of the LoRA target layers' weights "
            "(the earlier run trained other layers): nothing to initialise LoRA from"
        )
    log.info("peft.init svd: LoRA from the SVD of model.init_from's update; relative residual per layer %s",
             {k: round(v, 4) for k, v in residuals.items()})
    return residuals
