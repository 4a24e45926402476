"""The accountant against numbers the libraries give independently."""

from __future__ import annotations

import math
import warnings

import pytest

from fedfm.privacy.accounting import Plan, epsilon, round_event, solve_noise_multiplier

# The reference: sigma = 1, q = 0.1 (Poisson), 100 steps, delta = 1e-5.
POISSON = dict(population=1000, sample_size=100, sampling="poisson")


def test_rdp_and_pld_match_the_reference_numbers():
    assert epsilon(Plan(**POISSON, accountant="rdp"), [1.0] * 100, 1e-5) == pytest.approx(7.90, abs=0.01)
    assert epsilon(Plan(**POISSON, accountant="pld"), [1.0] * 100, 1e-5) == pytest.approx(7.05, abs=0.01)


def test_opacus_rdp_accountant_agrees():
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp
    from dp_accounting import PoissonSampledDpEvent, GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    opacus = RDPAccountant()
    opacus.history = [(1.0, 0.1, 100)]  # (noise multiplier, sample rate, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps_opacus = opacus.get_epsilon(1e-5)
    ours = epsilon(Plan(**POISSON), [1.0] * 100, 1e-5)
    assert eps_opacus == pytest.approx(ours, abs=0.01)  # 7.8993 vs 7.9039: different grids of orders
    # The epsilons differ by 0.005 because the two libraries evaluate the RDP of the sampled
    # Gaussian at fractional orders (here the optimum, 3.2) with different series; at integer
    # orders the RDP curves are the same to rounding.
    orders = [float(o) for o in range(2, 64)]
    rdp = compute_rdp(q=0.1, noise_multiplier=1.0, steps=100, orders=orders)
    acc = RdpAccountant(orders=orders)
    acc.compose(SelfComposedDpEvent(PoissonSampledDpEvent(0.1, GaussianDpEvent(1.0)), 100))
    assert list(acc._rdp) == pytest.approx(list(rdp), rel=1e-9)


def wor_epsilon(population, sample_size, multiplier, rounds, delta):
    """dp-accounting's own replace-one accountant, asked directly with the multiplier given."""
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    event = dpa.SampledWithoutReplacementDpEvent(population, sample_size, dpa.GaussianDpEvent(multiplier))
    acc.compose(dpa.SelfComposedDpEvent(event, rounds))
    return acc.get_epsilon(delta)


def test_fixed_size_sampling_is_replace_one_with_sensitivity_2c():
    # 10 of 100 clients per round without replacement, sigma 1, 100 rounds, delta 1e-5.
    # Replace-one: one client's clipped update swapped for another moves the sum by up to 2C,
    # so dp-accounting (multiplier = std / sensitivity) must get sigma / 2 = 0.5: epsilon 83.94.
    ours = epsilon(Plan(100, 10), [1.0] * 100, 1e-5)
    assert ours == pytest.approx(wor_epsilon(100, 10, 0.5, 100, 1e-5), rel=1e-9)
    assert ours == pytest.approx(83.94, abs=0.01)
    assert ours > wor_epsilon(100, 10, 1.0, 100, 1e-5) + 60  # 14.05: the figure without the factor 2
    # of the gap to Poisson sampling (7.90), the factor 2 alone explains 7.90 -> 36.97
    assert epsilon(Plan(**POISSON), [0.5] * 100, 1e-5) == pytest.approx(36.97, abs=0.01)
    # the adaptive-clipping example: 4 of 8 clients, sigma 1, 3 rounds
    assert epsilon(Plan(8, 4), [1.0] * 3, 1e-5) == pytest.approx(20.16, abs=0.01)


def test_one_fixed_size_round_at_order_2_by_hand():
    # WBK19 (Thm 9/27) at order 2 for the sampled Gaussian: log(1 + q^2 * min(4 (e^r - 1), 2 e^r)),
    # r = the Gaussian's RDP at order 2 = 2 * Delta^2 / (2 sigma^2 C^2) with Delta = 2C, sigma 1: r = 4.
    # q = 0.1: log(1 + 0.01 * 2 e^4) = log(2.0920) = 0.73810.
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(orders=[2.0], neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(round_event(Plan(100, 10), 1.0))
    assert float(acc._rdp[0]) == pytest.approx(math.log(1 + 0.01 * 2 * math.exp(4)), rel=1e-12)
    assert float(acc._rdp[0]) == pytest.approx(0.73810, abs=1e-5)
    # every client every round (q = 1): the plain Gaussian under add-or-remove-one, sensitivity C:
    # RDP at order 2 = 2 / (2 sigma^2) = 1 for sigma 1; the multiplier is NOT halved.
    full = RdpAccountant(orders=[2.0])
    full.compose(round_event(Plan(8, 8), 1.0))
    assert float(full._rdp[0]) == pytest.approx(1.0, rel=1e-12)
    assert round_event(Plan(8, 8), 1.0) == dpa.GaussianDpEvent(1.0)
    assert round_event(Plan(100, 10, "poisson"), 1.0) == dpa.PoissonSampledDpEvent(0.1, dpa.GaussianDpEvent(1.0))


def test_full_participation_is_unchanged():
    # every client every round: the Gaussian mechanism composed 4 times = one with sigma / 2
    assert epsilon(Plan(8, 8), [2.0] * 4, 1e-5) == pytest.approx(epsilon(Plan(8, 8), [1.0], 1e-5), rel=1e-6)
    assert epsilon(Plan(8, 8), [1.0] * 3, 1e-5) == pytest.approx(9.00996, abs=1e-4)  # the same before and after
    assert epsilon(Plan(8, 8), [], 1e-5) == 0.0
    with pytest.raises(ValueError, match="PLD accountant has no fixed-size"):
        epsilon(Plan(100, 10, accountant="pld"), [1.0], 1e-5)


def test_target_epsilon_solves_sigma():
    plan = Plan(**POISSON)
    sigma = solve_noise_multiplier(plan, 100, 7.9039, 1e-5)
    assert sigma == pytest.approx(1.0, abs=2e-3)
    assert epsilon(plan, [sigma] * 100, 1e-5) <= 7.9039 + 1e-9
    # 10 of 100, 20 rounds, epsilon 8: sigma 1.690 (0.845 without the factor 2, whose true epsilon is 47.3)
    fixed = Plan(100, 10)
    s8 = solve_noise_multiplier(fixed, 20, 8.0, 1e-5)
    assert s8 == pytest.approx(1.690, abs=2e-3)
    assert epsilon(fixed, [s8] * 20, 1e-5) == pytest.approx(8.0, abs=0.05)
    assert wor_epsilon(100, 10, s8 / 2, 20, 1e-5) == pytest.approx(8.0, abs=0.05)


def test_budget_check_at_config_time_uses_the_same_accountant(tmp_path):
    from conftest import tiny_config
    from fedfm.config import ConfigError, from_dict

    # 2 of 4 clients, sigma 2, 10 rounds: 16.36 with the factor 2 (7.16 without it), so a
    # budget of 10 is refused, with the accountant's figure in the message.
    over = {"federation.clients": 4, "federation.clients_per_round": 2, "rounds": 10}
    steps = [{"name": "dp_clip", "clip_norm": 1.0}, {"name": "dp_noise", "noise_multiplier": 2.0, "max_epsilon": 10.0}]
    assert epsilon(Plan(4, 2), [2.0] * 10, 1e-5) == pytest.approx(16.36, abs=0.01)
    with pytest.raises(ConfigError, match=r"spend epsilon 16\.36\d > max_epsilon 10\.0"):
        from_dict(tiny_config(tmp_path, server_steps=steps, **over))
    steps[1]["max_epsilon"] = 16.4
    from_dict(tiny_config(tmp_path, server_steps=steps, **over))


def test_pld_solves_sigma_without_exhausting_memory():
    """Full participation, one round: the PLD's sigma for epsilon 4 is the analytic Gaussian
    mechanism's (Balle and Wang 2018): delta(4) = Phi(-4 s + 1/(2s)) - e^4 Phi(-4 s - 1/(2s)) = 1e-5.
    The search starts at PLD_MIN_SIGMA (from 1e-3 it asked for 76 GB)."""
    import math
    from statistics import NormalDist

    from fedfm.privacy.accounting import PLD_MIN_SIGMA

    sigma = solve_noise_multiplier(Plan(8, 8, accountant="pld"), 1, 4.0, 1e-5)
    phi = NormalDist().cdf
    delta = phi(-4.0 * sigma + 1 / (2 * sigma)) - math.exp(4.0) * phi(-4.0 * sigma - 1 / (2 * sigma))
    assert delta == pytest.approx(1e-5, rel=0.01) and sigma == pytest.approx(1.0813, abs=1e-3)
    with pytest.raises(ValueError, match=rf"noise multiplier 0.05 is below {PLD_MIN_SIGMA}, .* use accountant: rdp"):
        epsilon(Plan(8, 8, accountant="pld"), [1.0, 0.05], 1e-5)
    with pytest.raises(ValueError, match=r"target_epsilon 1000000000.0: over 1 round\(s\) it takes a noise multiplier below 0.001"):
        solve_noise_multiplier(Plan(8, 8), 1, 1e9, 1e-5)
