"""MeZO's two-point estimate and its out-of-place perturbation, checked by value."""

from __future__ import annotations

import pytest
import torch

from fedfm.aggregators.zo_replay import param_noise
from fedfm.config import from_dict
from fedfm.core.types import Instruction
from fedfm.learners import build_learner
from fedfm.learners.zo_core import perturbed, spsa_estimate, step_along, trainable_params
from fedfm.peft.state import get_state, set_state
from fedfm.runtime.workbench import Workbench

from conftest import tiny_config


class Quadratic(torch.nn.Module):
    """f(w) = w1^2 + 3 w2^2 (float64)."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self):
        return self.w[0] ** 2 + 3 * self.w[1] ** 2


def test_estimate_is_the_directional_derivative_on_a_quadratic():
    # At w = (1, -1): grad f = (2 w1, 6 w2) = (2, -6), so the directional derivative along z
    # is 2 z1 - 6 z2. For a quadratic the central difference is exact:
    # f(w + e z) - f(w - e z) = 2 e grad.z, so g = grad.z up to float64 rounding (~1e-12 / e).
    model = Quadratic([1.0, -1.0])
    seed, eps = 7, 1e-3
    z = param_noise((2,), seed, 0).double()  # the only parameter: index 0
    g, plus, minus = spsa_estimate(model, lambda: model().item(), seed, eps)
    expected = 2 * z[0].item() - 6 * z[1].item()
    assert g == pytest.approx(expected, rel=1e-8, abs=1e-8)
    # and the two evaluations saw w + e z and w - e z
    w = torch.tensor([1.0, -1.0], dtype=torch.float64)
    f = lambda v: (v[0] ** 2 + 3 * v[1] ** 2).item()  # noqa: E731
    assert plus == f(w + eps * z) and minus == f(w - eps * z)


def test_in_place_perturbation_cannot_restore_float32_exactly():
    # Why the perturbation is out of place: x + e z - 2 e z + e z != x for some float32 x
    # (those much smaller than e|z| lose their low bits), so MeZO's in-place sequence
    # changes the weights it was meant to restore.
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 0.02
    z = param_noise((10_000,), 3, 0)
    eps = 1e-3
    y = x.clone()
    y.add_(z, alpha=eps)
    y.add_(z, alpha=-2 * eps)
    y.add_(z, alpha=eps)
    assert int((y != x).sum()) > 0


@pytest.fixture(scope="module", params=["lora", "full"])
def bench(request, tmp_path_factory):
    raw = tiny_config(tmp_path_factory.mktemp("mezo"))
    if request.param == "full":
        raw["peft"] = {"method": "full"}
    raw["learner"] = {"name": "mezo", "eps": 1e-3, "steps": 2}
    raw["train"] = {"lr": 1e-3, "batch_size": 8, "steps": 2}
    return Workbench(from_dict(raw))


def test_parameters_are_bit_identical_after_the_two_evaluations(bench):
    model = bench.model
    before = get_state(model)
    batch = bench.task.collate(bench.examples(0)[:8], bench.tokenizer)
    g, plus, minus = spsa_estimate(model, lambda: bench.task.loss(model, batch).item(), 11, 1e-2)
    after = get_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert plus != minus  # the perturbation did reach the model
    # the +eps evaluation equals a forward with the weights explicitly set to x + e z
    names = sorted(trainable_params(model))
    shifted = {n: before[n] + 1e-2 * param_noise(before[n].shape, 11, i) for i, n in enumerate(names)}
    set_state(model, shifted)
    with torch.no_grad():
        explicit = bench.task.loss(model, batch).item()
    set_state(model, before)
    assert explicit == pytest.approx(plus, rel=1e-6, abs=1e-7)


def test_perturbed_refuses_a_model_whose_parameter_it_cannot_reach():
    model = Quadratic([1.0, 2.0])
    with pytest.raises(RuntimeError, match="did not reach"):
        with perturbed(model, 0, 1e-3):
            pass  # no forward: nothing reached


def test_update_moves_along_the_regenerated_direction():
    model = Quadratic([1.0, -1.0])
    step_along(model, 5, -0.25)  # w <- w - 0.25 z(5)
    z = param_noise((2,), 5, 0).double()
    assert torch.equal(model.w.detach(), torch.tensor([1.0, -1.0], dtype=torch.float64) - 0.25 * z)


def test_mezo_learner_sends_the_zeroth_order_delta(bench):
    learner = build_learner(bench.exp.learner)
    inst = Instruction(round=1, cid=0, state=bench.initial_state())
    ctx = bench.context(0, 1)
    update = learner.local_update(inst, ctx)
    assert update.metrics["forward_passes"] == 4.0  # 2 steps x 2 forward passes
    assert set(update.payload) == set(inst.state)
    # delta = -lr (g1 z1 + g2 z2): it lies in the span of the two regenerated directions,
    # so the least-squares residual on the two directions is at float32 rounding level
    names = sorted(inst.state)
    from fedfm.core.seeding import derive_seed
    from fedfm.learners.mezo import MEZO_TAG

    dirs = [torch.cat([param_noise(inst.state[n].shape, derive_seed(ctx.seed, MEZO_TAG, t), i).flatten()
                       for i, n in enumerate(names)]) for t in range(2)]
    d = torch.cat([update.payload[n].flatten() for n in names]).double()
    basis = torch.stack(dirs, 1).double()
    coef = torch.linalg.lstsq(basis, d.unsqueeze(1)).solution
    residual = (basis @ coef).squeeze(1) - d
    assert d.norm() > 0
    assert residual.norm() <= 1e-3 * d.norm()


def test_native_draws_are_torchs_float32_randn_and_the_learner_moves_along_them(tmp_path):
    from fedfm.aggregators.zo_replay import ZO_TAG
    from fedfm.core.seeding import derive_seed
    from fedfm.learners.mezo import MEZO_TAG

    g = torch.Generator().manual_seed(derive_seed(9, ZO_TAG, 2))
    native = param_noise((8, 8), 9, 2, portable=False)
    assert torch.equal(native, torch.randn(8, 8, generator=g)) and native.dtype == torch.float32
    # from 16 entries torch's vectorised float32 kernel draws another sequence than the portable one
    assert bool((native != param_noise((8, 8), 9, 2)).all())
    raw = tiny_config(tmp_path)
    raw["peft"] = {"method": "full"}
    raw["learner"] = {"name": "mezo", "eps": 1e-3, "steps": 2, "draws": "native"}
    raw["train"] = {"lr": 1e-3, "batch_size": 8, "steps": 2}
    bench = Workbench(from_dict(raw))
    inst = Instruction(round=1, cid=0, state=bench.initial_state())
    ctx = bench.context(0, 1)
    update = build_learner(bench.exp.learner).local_update(inst, ctx)
    names = sorted(inst.state)
    d = torch.cat([update.payload[n].flatten() for n in names]).double()

    def residual(portable: bool) -> float:
        dirs = [torch.cat([param_noise(inst.state[n].shape, derive_seed(ctx.seed, MEZO_TAG, t), i, portable).flatten()
                           for i, n in enumerate(names)]) for t in range(2)]
        basis = torch.stack(dirs, 1).double()
        coef = torch.linalg.lstsq(basis, d.unsqueeze(1)).solution
        return float(((basis @ coef).squeeze(1) - d).norm())

    # the delta -lr (g1 z1 + g2 z2) lies in the span of the two native directions, not of the portable ones
    assert residual(False) <= 1e-3 * float(d.norm()) and residual(True) > 0.5 * float(d.norm())
