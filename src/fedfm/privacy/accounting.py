"""Privacy accounting for client-level DP with Google's ``dp-accounting`` library.

Rényi DP (Mironov 2017, "Rényi Differential Privacy"; the sampled Gaussian of Mironov,
Talwar & Zhang 2019) and privacy loss distributions (Koskela et al. 2020; Doroshenko et
al. 2022, "Connect the Dots: Tighter Discrete Approximations of Privacy Loss
Distributions") are both the library's; nothing here re-derives a bound. This module
only states which mechanism a run is and asks the library for its epsilon:

- one round = one sampled Gaussian mechanism with noise multiplier sigma (std of the noise
  on the SUM of clipped updates divided by the clip norm C);
- ``sampling="fixed"``: ``sample_size`` distinct clients of ``population`` per round, drawn
  uniformly without replacement: what ``runtime/sampling.py`` does with
  ``sampling: uniform``. dp-accounting analyses this event (Wang, Balle & Kasiviswanathan
  2019, "Subsampled Renyi Differential Privacy", Thm 27) only under the REPLACE-ONE
  neighbouring relation (the number of clients is public), and its formula takes the
  noise multiplier relative to the L2 sensitivity of the noised query. Replacing one
  client's update clipped to C by another moves the sum by up to 2C, so the sensitivity
  is 2C and the multiplier handed to the library is sigma / 2
  (``SampledWithoutReplacementDpEvent(N, k, GaussianDpEvent(sigma / 2))``; the library
  does not apply that factor itself, google/differential-privacy issue #378). RDP only:
  dp-accounting's PLD accountant has no sampling-without-replacement event, so ``pld``
  with fixed-size sampling is refused;
- ``sampling="poisson"``: each client joins each round independently with probability
  q, under the ADD-OR-REMOVE-ONE relation (sensitivity C, multiplier sigma), RDP or PLD;
- a round where every client takes part (q = 1) is the plain Gaussian mechanism under
  ADD-OR-REMOVE-ONE (sensitivity C, multiplier sigma), with either accountant.

So an epsilon of a run where every client takes part every round, or of Poisson
sampling, is stated for add-or-remove-one neighbours (whether a client took part at
all); one of fixed-size sampling of k < N clients is stated for replace-one neighbours
(one client's data swapped for another's, N public). Example, sigma 1, 100 rounds,
delta 1e-5: 10 of 100 clients fixed-size gives 83.9; Poisson at q = 0.1 gives 7.90 with
sigma and 37.0 with sigma / 2, so the factor 2 of the sensitivity explains 7.90 -> 37.0
and the without-replacement RDP bound the rest.

The history of a run is one sigma per round (rounds may differ: distributed DP with
dropouts carries less noise); identical sigmas are composed with ``SelfComposedDpEvent``.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Sequence

import dp_accounting as dpa
from dp_accounting import mechanism_calibration, pld, rdp

Accountant = Literal["rdp", "pld"]
Sampling = Literal["fixed", "poisson"]
PLD_DISCRETIZATION = 1e-4  # dp-accounting's default value_discretization_interval
# Below this noise multiplier the PLD accountant's discretized privacy-loss distribution
# grows past what a machine holds (measured, 3 rounds: sigma 0.05 takes 3.2 GB and 34 s,
# 0.03 7.3 GB, 0.001 asks for 76 GB); at 0.1 a round already spends epsilon ~90.
PLD_MIN_SIGMA = 0.1


@dataclass(frozen=True)
class Plan:
    """Who is sampled how: ``sample_size`` of ``population`` clients per round."""

    population: int
    sample_size: int
    sampling: Sampling = "fixed"
    accountant: Accountant = "rdp"

    @property
    def q(self) -> float:
        return self.sample_size / self.population

    def problem(self) -> str | None:
        """Why this plan cannot be accounted, or None."""
        if not 1 <= self.sample_size <= self.population:
            return f"sample_size {self.sample_size} must lie in 1..population {self.population}"
        if self.accountant == "pld" and self.sampling == "fixed" and self.sample_size < self.population:
            return ("dp-accounting's PLD accountant has no fixed-size sampling without replacement "
                    f"({self.sample_size} of {self.population} clients per round); use accountant: rdp")
        return None


REPLACE_ONE_SENSITIVITY = 2.0  # in units of C: replacing one clipped update moves the sum by up to 2C


def fixed_size(plan: Plan) -> bool:
    """True when the plan is accounted as sampling without replacement (replace-one)."""
    return plan.sampling == "fixed" and plan.sample_size < plan.population


def round_event(plan: Plan, sigma: float) -> dpa.DpEvent:
    """The DP event of one round with noise multiplier ``sigma`` (noise std on the sum / C)."""
    if sigma <= 0:
        gauss = dpa.NonPrivateDpEvent()
    elif fixed_size(plan):  # replace-one: the library wants std / (2C)
        gauss = dpa.GaussianDpEvent(sigma / REPLACE_ONE_SENSITIVITY)
    else:
        gauss = dpa.GaussianDpEvent(sigma)
    if plan.sample_size >= plan.population:
        return gauss
    if plan.sampling == "poisson":
        return dpa.PoissonSampledDpEvent(plan.q, gauss)
    return dpa.SampledWithoutReplacementDpEvent(plan.population, plan.sample_size, gauss)


def run_event(plan: Plan, sigmas: Sequence[float]) -> dpa.DpEvent:
    counts = sorted(Counter(float(s) for s in sigmas).items())
    return dpa.ComposedDpEvent([dpa.SelfComposedDpEvent(round_event(plan, s), n) for s, n in counts])


def fresh_accountant(plan: Plan) -> dpa.PrivacyAccountant:
    relation = dpa.NeighboringRelation.REPLACE_ONE if fixed_size(plan) else dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
    if plan.accountant == "rdp":
        return rdp.RdpAccountant(neighboring_relation=relation)
    return pld.PLDAccountant(neighboring_relation=relation, value_discretization_interval=PLD_DISCRETIZATION)


def epsilon(plan: Plan, sigmas: Sequence[float], delta: float) -> float:
    """epsilon at ``delta`` after the rounds whose noise multipliers are ``sigmas``."""
    problem = plan.problem()
    if problem is not None:
        raise ValueError(problem)
    if not sigmas:
        return 0.0
    if any(s <= 0 for s in sigmas):
        return float("inf")
    low = [s for s in sigmas if s < PLD_MIN_SIGMA]
    if plan.accountant == "pld" and low:
        raise ValueError(f"noise multiplier {min(low):g} is below {PLD_MIN_SIGMA}, where the PLD accountant's "
                         "distribution no longer fits in memory (epsilon would be above ~90 a round); "
                         "use accountant: rdp")
    acc = fresh_accountant(plan)
    acc.compose(run_event(plan, sigmas))
    return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def solve_noise_multiplier(plan: Plan, rounds: int, target_epsilon: float, delta: float) -> float:
    """The smallest sigma (to 1e-3 relative) whose ``rounds`` rounds spend at most
    ``target_epsilon`` at ``delta`` (dp-accounting's ``calibrate_dp_mechanism``)."""
    problem = plan.problem()
    if problem is not None:
        raise ValueError(problem)
    if target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    lowest = PLD_MIN_SIGMA if plan.accountant == "pld" else 1e-3  # the search starts no lower (PLD_MIN_SIGMA)
    try:
        sigma = dpa.calibrate_dp_mechanism(
            lambda: fresh_accountant(plan),
            lambda s: dpa.SelfComposedDpEvent(round_event(plan, s), rounds),
            target_epsilon,
            delta,
            dpa.LowerEndpointAndGuess(lowest, 1.0),
            tol=1e-4,
        )
    except mechanism_calibration.NoBracketIntervalFoundError:
        raise ValueError(f"target_epsilon {target_epsilon}: over {rounds} round(s) it takes a noise multiplier "
                         f"below {lowest}, below which the {plan.accountant} accountant is not searched; lower "
                         "target_epsilon" + ("" if plan.accountant == "rdp" else " or use accountant: rdp")) from None
    return float(sigma)


__all__ = ["Plan", "epsilon", "fixed_size", "fresh_accountant", "round_event", "run_event", "solve_noise_multiplier"]
