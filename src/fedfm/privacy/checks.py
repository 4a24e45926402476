"""Config-time checks of the privacy components: combinations that cannot give the
stated guarantee are refused before anything loads, with the numbers, a run whose
planned rounds would spend more than its budget refuses to start, and a run that draws
DP noise refuses an empty or short ``FEDFM_DP_NOISE_KEY`` in this process's environment."""

from __future__ import annotations

import math

from fedfm.privacy.accounting import epsilon
from fedfm.privacy.clipping import DpClipParams, update_noise_multiplier
from fedfm.privacy.distributed import DpClientNoiseParams
from fedfm.privacy.noise import DpNoiseParams, resolved_sigma
from fedfm.privacy.noise_key import key_problem
from fedfm.privacy.plan import plan_of

SERVER_HALVES = ("scaffold", "feddyn", "prunefl", "flash")  # flash, prunefl: masks and squared gradients


def _steps(exp, name: str) -> list[tuple[int, dict]]:
    return [(i, s) for i, s in enumerate(exp.server_steps) if isinstance(s, dict) and s.get("name") == name]


def _params(model, spec: dict):
    try:
        return model(**{k: v for k, v in spec.items() if k != "name"})
    except Exception:  # reported by the registry check already
        return None


def _client_noise(exp) -> list[tuple[object, DpClientNoiseParams | None]]:
    return [(r, _params(DpClientNoiseParams, m)) for r in exp.federation.roles for m in r.middleware if m.get("name") == "dp_client_noise"]


def sample_dp_problems(exp) -> list[str]:
    has_step = bool(_steps(exp, "dp_sgd_accountant"))
    if exp.learner.name == "dp_sgd" and not has_step:
        return ["learner.name: dp_sgd needs a dp_sgd_accountant server step, or no epsilon is reported"]
    if has_step and exp.learner.name != "dp_sgd":
        return [f"server_steps: dp_sgd_accountant accounts the dp_sgd learner, not '{exp.learner.name}'"]
    return []


def privacy_problems(exp) -> list[str]:
    from fedfm.privacy.secagg.checks import secagg_problems

    return sample_dp_problems(exp) + client_dp_problems(exp) + noise_key_problems(exp) + secagg_problems(exp)


def noise_key_problems(exp) -> list[str]:
    """A set but unusable FEDFM_DP_NOISE_KEY in this process, when the run draws DP noise."""
    draws = exp.learner.name == "dp_sgd" or _steps(exp, "dp_noise") or _steps(exp, "dp_clip") or _client_noise(exp)
    problem = key_problem() if draws else None
    return [problem] if problem else []


def client_dp_problems(exp) -> list[str]:
    clips, noises, shares = _steps(exp, "dp_clip"), _steps(exp, "dp_noise"), _client_noise(exp)
    if not (clips or noises or shares):
        return []
    problems = []
    if len(noises) > 1 or len(clips) > 1:
        problems.append("server_steps: at most one dp_clip and one dp_noise step (their accounting would not compose)")
    if exp.aggregator.rule != "fedavg":
        problems.append(f"aggregator.rule: client-level DP bounds the sensitivity of the mean of clipped updates (fedavg); "
                        f"'{exp.aggregator.rule}' has another sensitivity that is not accounted")
    if exp.learner.name in SERVER_HALVES:
        problems.append(f"learner.name: {exp.learner.name}'s server half combines extra client tensors outside the DP mechanism")
    if exp.federation.sampling != "uniform":
        problems.append("federation.sampling: the accountant assumes uniform fixed-size client sampling; "
                        f"'{exp.federation.sampling}' sampling is not accounted")
    if not noises:
        problems.append("server_steps: dp_clip or dp_client_noise without a dp_noise step: nothing is noised or accounted")
        return problems
    idx, spec = noises[0]
    p = _params(DpNoiseParams, spec)
    if p is None:
        return problems
    plan = plan_of(exp, p.accountant)
    if plan.problem() is not None:
        problems.append(f"server_steps[{idx}] (dp_noise): {plan.problem()}")
        return problems
    if p.mode == "central":
        if not clips or clips[0][0] > idx:
            problems.append(f"server_steps[{idx}] (dp_noise, central): needs a dp_clip step before it")
        if shares:
            problems.append("federation.roles: dp_client_noise adds client noise but dp_noise is central (set mode: distributed)")
    else:
        if p.target_epsilon is not None:
            sigma = resolved_sigma(p, plan, exp.rounds)
            problems.append(f"server_steps[{idx}] (dp_noise, distributed): the clients need sigma too; target_epsilon "
                            f"{p.target_epsilon} gives noise_multiplier {sigma:.4f}: set it on dp_noise and dp_client_noise")
        if clips:
            problems.append("server_steps: dp_clip with distributed DP: the clients clip; the server must not rescale noised updates")
        covered = sum(_role_size(r, exp.federation.clients) for r, _ in shares)
        if covered != exp.federation.clients:
            problems.append(f"federation.roles: distributed DP needs dp_client_noise on every client ({covered} of "
                            f"{exp.federation.clients} have it)")
        for r, mp in shares:
            if mp is None:
                continue
            if p.noise_multiplier is not None and not math.isclose(mp.noise_multiplier, p.noise_multiplier):
                problems.append(f"role '{r.name}': dp_client_noise noise_multiplier {mp.noise_multiplier} differs from "
                                f"dp_noise's {p.noise_multiplier}")
            if mp.clients_per_round != plan.sample_size:
                problems.append(f"role '{r.name}': dp_client_noise clients_per_round {mp.clients_per_round} differs from "
                                f"the {plan.sample_size} clients sampled per round")
    if p.mode == "central" and clips:
        cp = _params(DpClipParams, clips[0][1])
        if cp is not None and cp.target_quantile is not None:
            sigma = resolved_sigma(p, plan, exp.rounds)
            sigma_b = cp.count_noise if cp.count_noise is not None else plan.sample_size / 20.0
            try:
                update_noise_multiplier(sigma, sigma_b)
            except ValueError as exc:
                problems.append(f"server_steps[{clips[0][0]}] (dp_clip): {exc}")
    if p.max_epsilon is not None:
        sigma = resolved_sigma(p, plan, exp.rounds)
        eps = epsilon(plan, [sigma] * exp.rounds, p.delta)
        if eps > p.max_epsilon + 1e-9:
            problems.append(f"server_steps[{idx}] (dp_noise): the privacy budget is spent: {exp.rounds} rounds with "
                            f"noise_multiplier {sigma:.4f}, {plan.sample_size} of {plan.population} clients per round "
                            f"({plan.accountant}) spend epsilon {eps:.3f} > max_epsilon {p.max_epsilon} at delta {p.delta}")
    return problems


def _role_size(role, n: int) -> int:
    from fedfm.runtime.roles import role_sizes

    return role_sizes([role], n)[0]
