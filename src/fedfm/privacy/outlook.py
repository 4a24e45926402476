"""What a run's client-level DP will spend and do, before it starts: ``fedfm check`` and
``fedfm run`` print the noise multiplier (given, or solved for ``target_epsilon``), the
clients per round and the epsilon the planned rounds spend, and warn when that noise
swamps every update.

The warning's criterion: ``dp_noise`` adds noise of std ``sigma * C / n`` to every
coordinate of the mean of ``n`` updates clipped to norm ``C`` (``privacy/noise.py``), so
with ``sigma > n`` one coordinate's noise alone exceeds the norm of any clipped update,
and of their mean: each round moves the model by more noise than any signal it could
carry. With adaptive clipping (``dp_clip``'s ``target_quantile``) the updates get the raised
multiplier sigma_Delta (``privacy/clipping.update_noise_multiplier``), which the line names
and the warning compares. A tiny ``target_epsilon`` is honoured that way (1e-4 over 3 rounds of 8 of 8
clients takes sigma 1.285e5), and the accountant is right to report epsilon 0; the warning
says what it costs.
"""

from __future__ import annotations

from fedfm.privacy.accounting import epsilon
from fedfm.privacy.clipping import DpClipParams, update_noise_multiplier
from fedfm.privacy.noise import DpNoiseParams, resolved_sigma
from fedfm.privacy.plan import plan_of


def _noise_steps(exp) -> list[tuple[int, DpNoiseParams]]:
    found = []
    for i, spec in enumerate(exp.server_steps):
        if isinstance(spec, dict) and spec.get("name") == "dp_noise":
            found.append((i, DpNoiseParams(**{k: v for k, v in spec.items() if k != "name"})))
    return found


def _update_sigma(exp, p: DpNoiseParams, sigma: float, sample_size: int) -> float:
    """sigma_Delta, the multiplier of the noise the updates get: raised above sigma when
    central noise follows adaptive clipping (the count is released too)."""
    clips = [s for s in exp.server_steps if isinstance(s, dict) and s.get("name") == "dp_clip"]
    if p.mode != "central" or not clips:
        return sigma
    cp = DpClipParams(**{k: v for k, v in clips[0].items() if k != "name"})
    if cp.target_quantile is None:
        return sigma
    try:
        return update_noise_multiplier(sigma, cp.count_noise if cp.count_noise is not None else sample_size / 20.0)
    except ValueError:  # the config checks name it (privacy/checks.py)
        return sigma


def dp_outlook(exp) -> tuple[list[str], list[str]]:
    """(lines, warnings) for every ``dp_noise`` step of a config the checks accepted."""
    lines, warnings = [], []
    for idx, p in _noise_steps(exp):
        plan = plan_of(exp, p.accountant)
        sigma = resolved_sigma(p, plan, exp.rounds)
        spent = epsilon(plan, [sigma] * exp.rounds, p.delta)
        how = "given" if p.noise_multiplier is not None else f"solved for target_epsilon {p.target_epsilon}"
        where = f"server_steps[{idx}] (dp_noise, {p.mode})"
        raised = _update_sigma(exp, p, sigma, plan.sample_size)
        on_updates = f" (updates: {raised:.4g}, raised for adaptive clipping)" if raised != sigma else ""
        lines.append(f"{where}: noise_multiplier {sigma:.4g}{on_updates} ({how}), {plan.sample_size} of {plan.population} "
                     f"clients per round, {exp.rounds} round(s): epsilon {spent:.4g} at delta {p.delta:g} ({p.accountant})")
        if raised > plan.sample_size:
            warnings.append(f"{where}: noise_multiplier {raised:.4g}{' on the updates' if on_updates else ''} with "
                            f"{plan.sample_size} clients per round adds noise of std {raised / plan.sample_size:.4g} x the clip norm to every coordinate of each round's "
                            "mean update, more than the norm of any clipped update: the model will mostly move by "
                            "noise (raise target_epsilon, or sample more clients per round)")
    return lines, warnings


__all__ = ["dp_outlook"]
