"""Server optimizers applied to the aggregated pseudo-gradient (Reddi et al. 2021,
"Adaptive Federated Optimization", Algorithm 2; FedAvgM: Hsu et al. 2019, "Measuring the
Effects of Non-Identical Data Distribution for Federated Visual Classification").

The aggregation rule combines client deltas into one pseudo-gradient ``delta`` (for
FedAvg, the example-weighted mean of ``w_k - w``); the server optimizer turns it into the
new State. Each optimizer is a pure function

    (state, delta, moments, params) -> (new_state, new_moments)

where ``moments`` maps a slot name ("m", "v") to a State; an empty dict means the first
round. Moments are explicit server state, checkpointed by the Algorithm's ``state_dict``.

Written by hand rather than with ``torch.optim``: Reddi et al.'s updates have no bias
correction and add ``tau`` outside the square root, initialise ``v`` to ``tau**2``, and
FedYogi exists in no torch optimizer; torch.optim would also hide the moments in an
index-keyed ``state_dict`` of parameter objects, whereas here they are named tensors that
a test can check by hand after one step.

    sgd        w <- w + lr * delta                          (lr 1.0 = FedAvg exactly)
    fedavgm    v <- momentum * v + delta;  w <- w + lr * v
    fedadam    m <- b1 m + (1-b1) delta;  v <- b2 v + (1-b2) delta^2
    fedyogi    m as Adam;  v <- v - (1-b2) delta^2 sign(v - delta^2)
    fedadagrad m as Adam;  v <- v + delta^2
               (adaptive ones)  w <- w + lr * m / (sqrt(v) + tau),  v starts at tau^2
"""

from __future__ import annotations

from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.core.registry import Registry
from fedfm.core.types import State

Moments = dict[str, State]
ServerOptimizer = Callable[[State, State, Moments, BaseModel], tuple[State, Moments]]
server_optimizers: Registry[ServerOptimizer] = Registry("server_optimizer.name")


def register_server_optimizer(name: str, fn: ServerOptimizer, params: type[BaseModel]) -> ServerOptimizer:
    return server_optimizers.register(name, fn, params)


class SgdParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = Field(1.0, gt=0, allow_inf_nan=False, description="server learning rate; 1.0 is plain FedAvg")


class AvgMParams(SgdParams):
    momentum: float = Field(0.9, ge=0, lt=1, description="server momentum beta")


class AdagradParams(BaseModel):
    """FedAdagrad's: no beta2 (v sums every delta^2), so a beta2 given is refused, not ignored."""

    model_config = ConfigDict(extra="forbid")
    lr: float = Field(1e-2, gt=0, allow_inf_nan=False, description="server learning rate eta")
    beta1: float = Field(0.0, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0, allow_inf_nan=False, description="adaptivity: added to sqrt(v); v starts at tau^2")


class AdaptiveParams(AdagradParams):
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)


def _zeros(state: State) -> State:
    return {k: torch.zeros_like(v) for k, v in state.items()}


def _filled(state: State, value: float) -> State:
    return {k: torch.full_like(v, value) for k, v in state.items()}


def sgd(state: State, delta: State, moments: Moments, params: SgdParams) -> tuple[State, Moments]:
    return {k: state[k] + params.lr * delta[k].to(state[k].dtype) for k in state}, {}


def fedavgm(state: State, delta: State, moments: Moments, params: AvgMParams) -> tuple[State, Moments]:
    v_prev = moments.get("v") or _zeros(state)
    v = {k: params.momentum * v_prev[k] + delta[k].to(state[k].dtype) for k in state}
    return {k: state[k] + params.lr * v[k] for k in state}, {"v": v}


def _first_moment(state: State, delta: State, moments: Moments, beta1: float) -> State:
    m_prev = moments.get("m") or _zeros(state)
    return {k: beta1 * m_prev[k] + (1 - beta1) * delta[k].to(state[k].dtype) for k in state}


def _adaptive_step(state: State, m: State, v: State, params: AdaptiveParams) -> State:
    return {k: state[k] + params.lr * m[k] / (v[k].sqrt() + params.tau) for k in state}


def fedadam(state: State, delta: State, moments: Moments, params: AdaptiveParams) -> tuple[State, Moments]:
    m = _first_moment(state, delta, moments, params.beta1)
    v_prev = moments.get("v") or _filled(state, params.tau**2)
    v = {k: params.beta2 * v_prev[k] + (1 - params.beta2) * delta[k].to(state[k].dtype) ** 2 for k in state}
    return _adaptive_step(state, m, v, params), {"m": m, "v": v}


def fedyogi(state: State, delta: State, moments: Moments, params: AdaptiveParams) -> tuple[State, Moments]:
    m = _first_moment(state, delta, moments, params.beta1)
    v_prev = moments.get("v") or _filled(state, params.tau**2)
    v = {}
    for k in state:
        d2 = delta[k].to(state[k].dtype) ** 2
        v[k] = v_prev[k] - (1 - params.beta2) * d2 * torch.sign(v_prev[k] - d2)
    return _adaptive_step(state, m, v, params), {"m": m, "v": v}


def fedadagrad(state: State, delta: State, moments: Moments, params: AdagradParams) -> tuple[State, Moments]:
    m = _first_moment(state, delta, moments, params.beta1)
    v_prev = moments.get("v") or _filled(state, params.tau**2)
    v = {k: v_prev[k] + delta[k].to(state[k].dtype) ** 2 for k in state}
    return _adaptive_step(state, m, v, params), {"m": m, "v": v}


register_server_optimizer("sgd", sgd, SgdParams)
register_server_optimizer("fedavgm", fedavgm, AvgMParams)
register_server_optimizer("fedadam", fedadam, AdaptiveParams)
register_server_optimizer("fedyogi", fedyogi, AdaptiveParams)
register_server_optimizer("fedadagrad", fedadagrad, AdagradParams)


def not_as_is(so) -> str | None:
    """None when ``server_optimizer`` adds the combined delta as it is (``sgd`` at lr 1, or
    ``fedavgm`` at lr 1 and momentum 0), else
    what it is, with its own defaults (``"fedadam (lr 0.01)"``): for the server halves and
    steps that compute the model step themselves. A config whose parameters do not parse is
    left to the registry's check (None)."""
    try:
        params = server_optimizers.parse(so.name, so.params(), "server_optimizer").model_dump()
    except Exception:
        return None
    lr, momentum = params.get("lr"), params.get("momentum")
    if lr == 1.0 and (so.name == "sgd" or (so.name == "fedavgm" and momentum == 0)):  # fedavgm at momentum 0: v = delta
        return None
    return f"{so.name} (lr {lr}{'' if momentum is None else f', momentum {momentum}'})"
