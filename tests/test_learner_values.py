"""Client algorithms checked by value, so that a wrong sign fails.

One plain-SGD step (momentum 0, weight decay 0, no gradient clipping, ``train.steps: 1``)
on one batch that holds all of the client's examples, with dropout off: the loss gradient
``g`` at the server weights ``w`` is then the same in every run, and

- plain:    Δ_plain    = -lr · g
- FedDyn:   Δ_dyn      = -lr · (g - g_prev + alpha (v - w)) with v = w at the first step,
            so Δ_dyn - Δ_plain = lr · g_prev
- SCAFFOLD: Δ_scaffold = -lr · (g + c - c_i), so Δ_scaffold - Δ_plain = -lr · (c - c_i)

The client-side state updates follow from the same step: FedDyn's g_prev+ = g_prev - alpha
Δ_dyn, and SCAFFOLD's new c_i (option II and ``mean_grad`` alike) equals g = -Δ_plain/lr.

Tolerances: 1e-6 relative to the expected value plus a few float32 ulps of the weights
(every delta is ``fl(w - lr·grad) - w``, exact up to rounding at the scale of ``w``).
"""

from __future__ import annotations

import pytest
import torch

from fedfm.config import from_dict
from fedfm.core.types import Instruction, State
from fedfm.learners import build_learner
from fedfm.aggregators.scaffold import split_payload
from fedfm.runtime.store import ClientStore
from fedfm.runtime.workbench import Workbench

from conftest import TINY_BERT, tiny_config

LR = 0.1
EPS = torch.finfo(torch.float32).eps
CID = 0


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    raw = tiny_config(tmp_path_factory.mktemp("values"))
    raw["model"]["config_overrides"] = {**TINY_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    raw["train"] = {
        "optimizer": "sgd",
        "lr": LR,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "max_grad_norm": None,
        "steps": 1,
        "batch_size": 1024,  # more than any client holds: one batch of all its examples
    }
    bench = Workbench(from_dict(raw))
    assert len(bench.examples(CID)) <= raw["train"]["batch_size"]
    return bench


def spec(name: str, **params):
    return type("Spec", (), {"name": name, "params": lambda self: params})()


def known(state: State, seed: int, low: float = 0.5, high: float = 1.5) -> State:
    """Non-zero tensors shaped like ``state``: magnitudes in [low, high], random signs."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        mag = low + (high - low) * torch.rand(v.shape, generator=g)
        sign = torch.where(torch.rand(v.shape, generator=g) < 0.5, -1.0, 1.0)
        out[k] = mag * sign
    return out


@pytest.fixture(scope="module")
def start(wb) -> State:
    """The server State, with LoRA's B moved off zero so that every tensor has a gradient."""
    state = wb.initial_state()
    g = torch.Generator().manual_seed(1)
    return {k: (0.05 * torch.randn(v.shape, generator=g) if "lora_B" in k else v) for k, v in state.items()}


def instruction(state: State, rnd: int = 1, cid: int = CID, scaffold_c: State | None = None) -> Instruction:
    """What the server sends this client. SCAFFOLD's server control variate rides along
    here; only this helper knows how it travels."""
    groups = {} if scaffold_c is None else {"scaffold_c": scaffold_c}
    return Instruction(rnd, cid, state, broadcast=groups)


def one_step(wb, name: str, inst: Instruction, store=None, **params):
    return build_learner(spec(name, **params)).local_update(inst, wb.context(inst.cid, inst.round, store=store))


def assert_by_value(got: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor, name: str, ulps: float = 8.0):
    """|got - expected| <= 1e-6 |expected| + ulps * eps * scale, entry by entry."""
    bound = 1e-6 * expected.abs() + ulps * EPS * scale
    err = (got - expected).abs()
    worst = float((err - bound).max())
    assert worst <= 0, f"{name}: max excess {worst:.3e} (max error {float(err.max()):.3e})"


def plain_delta(wb, state: State) -> State:
    delta = one_step(wb, "local", instruction(state)).payload
    # The gradient is not trivially zero anywhere that matters: the checks below are not vacuous.
    assert all(bool((d != 0).any()) for d in delta.values())
    return delta


def weight_scale(state: State, *deltas: State) -> State:
    return {k: state[k].abs() + sum(d[k].abs() for d in deltas) for k in state}


# -- FedDyn --------------------------------------------------------------------------


def test_feddyn_step_adds_lr_times_previous_gradient(wb, start, tmp_path):
    plain = plain_delta(wb, start)
    store = ClientStore(tmp_path / "clients")
    g_prev = known(start, seed=2)
    store.put(CID, "feddyn_grad", g_prev)
    alpha = 0.1
    dyn = one_step(wb, "feddyn", instruction(start), store=store, alpha=alpha).payload
    scale = weight_scale(start, plain, dyn)
    for k in start:
        assert_by_value(dyn[k] - plain[k], LR * g_prev[k], scale[k], k)
    # The client keeps g_prev+ = g_prev - alpha (v - w).
    g_new = store.get(CID, "feddyn_grad")
    for k in start:
        assert torch.allclose(g_new[k], g_prev[k] - alpha * dyn[k], rtol=1e-6, atol=1e-7), k


def test_feddyn_without_previous_gradient_is_plain_sgd_at_the_first_step(wb, start, tmp_path):
    plain = plain_delta(wb, start)
    dyn = one_step(wb, "feddyn", instruction(start), store=ClientStore(tmp_path / "c"), alpha=0.5).payload
    scale = weight_scale(start, plain, dyn)
    for k in start:
        assert_by_value(dyn[k], plain[k], scale[k], k)


# -- SCAFFOLD ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["delta", "mean_grad"])
def test_scaffold_step_subtracts_lr_times_correction(wb, start, tmp_path, mode):
    plain = plain_delta(wb, start)
    store = ClientStore(tmp_path / "clients")
    c = known(start, seed=3)
    c_i = known(start, seed=4, low=0.1, high=0.4)
    store.put(CID, "scaffold_c", c_i)
    upd = one_step(wb, "scaffold", instruction(start, scaffold_c=c), store=store, control_update=mode)
    model, dc = split_payload(upd.payload)
    assert set(model) == set(start) and set(dc) == set(start)
    scale = weight_scale(start, plain, model)
    for k in start:
        assert_by_value(model[k] - plain[k], -LR * (c[k] - c_i[k]), scale[k], k)
    # Both control updates give c_i+ = g = -Δ_plain / lr after one SGD step; the payload
    # carries c_i+ - c_i and the store holds c_i+.
    c_new = store.get(CID, "scaffold_c")
    for k in start:
        g = -plain[k] / LR
        # option II divides a weight difference by lr: its rounding is ulps of w over lr
        assert_by_value(c_new[k], g, scale[k] / LR, f"c_i+ {k}", ulps=16)
        assert torch.equal(dc[k], c_new[k] - c_i[k]), k


def test_scaffold_with_equal_controls_is_plain_sgd(wb, start, tmp_path):
    plain = plain_delta(wb, start)
    store = ClientStore(tmp_path / "clients")
    c = known(start, seed=5)
    store.put(CID, "scaffold_c", c)
    model, _ = split_payload(one_step(wb, "scaffold", instruction(start, scaffold_c=c), store=store).payload)
    scale = weight_scale(start, plain, model)
    for k in start:
        assert_by_value(model[k], plain[k], scale[k], k)
