"""Dual adapters: a shared (global) and a personal (client-specific) bottleneck adapter
side by side at every adapter placement, the structure of FedDAT (Chen et al. 2024,
"FedDAT: An Approach for Foundation Model Finetuning in Multi-Modal Heterogeneous
Federated Learning", AAAI).

Placements, width and initialisation are those of ``peft/adapters.py`` (after a sublayer's
output projection; ``up`` starts at zero), with two differences from its ``houlsby``
variant: the adapters sit before BERT's hidden dropout (the ``adapter`` tuner now places
them after it, as adapter-bert does), and the LayerNorms train only with
``train_layernorm: true`` (``houlsby`` trains them by default). Each placement holds:

- ``shared``: the global adapter (trainable, travels);
- ``personal``: the client-specific adapter (trainable; meant to stay on the client with
  ``peft.local: ["*.personal.*"]``);
- a frozen *teacher copy* of the shared adapter (non-persistent buffers, never in the
  State): FedDAT's Dual-Adapter Teacher pairs the personal adapter with a frozen copy of the
  global adapter received at the start of the round (``arm_teacher``).

Modes (``set_mode``): ``dual`` (default) computes ``h + shared(h) + personal(h)`` (with the
teacher copy in place of ``shared`` while training with an armed teacher): the client's
personalised model, and, because ``personal.up`` starts at zero, the global model wherever a
client's personal adapter was never trained (the server's global evaluation);
``global`` computes ``h + shared(h)`` only: the student of FedDAT's distillation.
Written by hand for the same reason as ``adapters.py`` (peft has no bottleneck adapter).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal

import torch
import torch.nn.functional as F

from fedfm.peft.adapters import AdapterParams, Bottleneck, adapter_targets, train_extras
from fedfm.peft.base import register_tuner
from fedfm.peft.freezing import freeze_all, set_submodule

MODES = ("dual", "global")


def bottleneck_delta(b: Bottleneck, h: torch.Tensor) -> torch.Tensor:
    return b.up(b.act(b.down(h)))  # (B, T, H)


class DualAdaptedLinear(torch.nn.Module):
    """A frozen output projection followed by a shared and a personal adapter in parallel."""

    def __init__(self, base: torch.nn.Linear, shared: Bottleneck, personal: Bottleneck):
        super().__init__()
        self.base = base
        self.shared = shared
        self.personal = personal
        for name, p in shared.named_parameters():
            self.register_buffer("teacher_" + name.replace(".", "_"), p.detach().clone(), persistent=False)
        self.mode: str = "dual"
        self.teacher_armed = False

    def arm_teacher(self) -> None:
        """Copy the shared adapter into the frozen teacher copy (start of a FedDAT round)."""
        with torch.no_grad():
            for name, p in self.shared.named_parameters():
                getattr(self, "teacher_" + name.replace(".", "_")).copy_(p)
        self.teacher_armed = True

    def teacher_delta(self, h: torch.Tensor) -> torch.Tensor:
        z = F.linear(h, self.teacher_down_weight, self.teacher_down_bias)
        return F.linear(self.shared.act(z), self.teacher_up_weight, self.teacher_up_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, in)
        h = self.base(x)  # (B, T, H)
        if self.mode == "global":
            return h + bottleneck_delta(self.shared, h)
        if self.training and self.teacher_armed:
            common = self.teacher_delta(h)
        else:
            common = bottleneck_delta(self.shared, h)
        return h + common + bottleneck_delta(self.personal, h)  # (B, T, H)


def dual_modules(model: torch.nn.Module) -> list[DualAdaptedLinear]:
    return [m for m in model.modules() if isinstance(m, DualAdaptedLinear)]


def set_mode(model: torch.nn.Module, mode: Literal["dual", "global"]) -> None:
    if mode not in MODES:
        raise ValueError(f"dual adapter mode '{mode}' is not one of {MODES}")
    for m in dual_modules(model):
        m.mode = mode


@contextmanager
def adapter_mode(model: torch.nn.Module, mode: Literal["dual", "global"]) -> Iterator[None]:
    set_mode(model, mode)
    try:
        yield
    finally:
        set_mode(model, "dual")


def arm_teachers(model: torch.nn.Module, armed: bool = True) -> None:
    for m in dual_modules(model):
        if armed:
            m.arm_teacher()
        else:
            m.teacher_armed = False


def dual_adapters(model: torch.nn.Module, params: AdapterParams, task: str) -> torch.nn.Module:
    freeze_all(model)
    for name in adapter_targets(model, params):
        base = model.get_submodule(name)
        width = max(1, base.out_features // params.reduction_factor)
        shared = Bottleneck(base.out_features, width, params.activation, params.init_std)
        personal = Bottleneck(base.out_features, width, params.activation, params.init_std)
        wrapped = DualAdaptedLinear(base, shared, personal).to(base.weight.device, base.weight.dtype)
        set_submodule(model, name, wrapped)
    return train_extras(model, params)


register_tuner("dual_adapter", dual_adapters, AdapterParams)
