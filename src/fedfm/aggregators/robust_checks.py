"""Config-time checks of the robust rules and steps: settings that cannot work, refused
with the numbers before any data or model loads (called from
``fedfm.components.combination_problems``).

The number of updates a rule sees per round is the number of sampled clients
(``federation.clients_per_round``, ``ceil(fraction * clients)``, or all clients). A round
that dropouts, stragglers past a deadline, failed or rejected clients leave smaller than
the rule can combine (``round_problem``, ``fewest_updates``) is retried or skipped by the
round loop like one below ``federation.min_clients`` (``runtime/loop.py``).
"""

from __future__ import annotations

from fedfm.aggregators.trimmed_mean import trim_count


def per_round(fed) -> int:
    """The clients a round samples (``runtime.sampling.clients_per_round``, the loop's own)."""
    from fedfm.runtime.sampling import clients_per_round

    return clients_per_round(fed, fed.clients)


def rule_problem(rule: str, params: dict, n: int) -> str | None:
    f = int(params.get("f", 1))
    if rule in ("krum", "multi_krum") and not n > 2 * f + 2:
        return f"aggregator: {rule} with f={f} needs more than 2f + 2 = {2 * f + 2} clients per round, got {n}"
    if rule == "multi_krum" and int(params.get("m", 1)) > n:
        return f"aggregator.m: multi_krum averages m={params.get('m')} updates but a round has {n}"
    if rule == "bulyan" and n < 4 * f + 3:
        return f"aggregator: bulyan with f={f} needs at least 4f + 3 = {4 * f + 3} clients per round, got {n}"
    if rule == "trimmed_mean":
        beta = float(params.get("beta", 0.1))
        k = trim_count(beta, n)
        if 2 * k >= n:
            return f"aggregator.beta: trimmed_mean trims k = floor({beta} * {n}) = {k} at each end; needs 2k < n = {n}"
    return None


def round_problem(rule: str, params: dict, r: int) -> str | None:
    """Why ``rule`` cannot aggregate a round of ``r`` updates (what the rule itself raises
    on), or None. Looser than ``rule_problem``: Krum runs from f + 3 updates, without its
    guarantee below 2f + 3."""
    f = int(params.get("f", 1))
    if rule in ("krum", "multi_krum") and r < f + 3:
        return f"{rule} with f={f} needs n - f - 2 >= 1 neighbours, so at least f + 3 = {f + 3} updates"
    if rule == "multi_krum" and r < int(params.get("m", 1)):
        return f"multi_krum averages m={params.get('m')} updates"
    if rule == "bulyan" and r < 4 * f + 3:
        return f"bulyan with f={f} needs at least 4f + 3 = {4 * f + 3} updates"
    if rule == "trimmed_mean":
        beta = float(params.get("beta", 0.1))
        if 2 * trim_count(beta, r) >= r:
            return f"trimmed_mean with beta={beta} trims floor({beta} * {r}) = {trim_count(beta, r)} at each end of {r} updates"
    return None


def fewest_updates(rule: str, params: dict, most: int) -> int:
    """The fewest updates from which ``rule`` aggregates every round of up to ``most``
    (one above the largest count ``round_problem`` refuses; 1 for a rule that takes any).
    The round loop (``runtime/loop.py``) treats a round below it as one below
    ``federation.min_clients``: retried or skipped, never a stopped run."""
    for r in range(most, 0, -1):
        if round_problem(rule, params, r) is not None:
            return r + 1
    return 1


def robust_problems(exp) -> list[str]:
    problems = []
    n = per_round(exp.federation)
    reason = rule_problem(exp.aggregator.rule, exp.aggregator.params(), n)
    if reason is not None:
        problems.append(reason)
    from fedfm.attacks.checks import attack_problems

    problems.extend(attack_problems(exp, n))
    names = [s.get("name") for s in exp.server_steps]
    if "centered_clip" in names:
        if exp.aggregator.rule != "fedavg":
            problems.append(f"server_steps: centered_clip hands the rule updates whose mean is its result; set aggregator.rule: fedavg, not {exp.aggregator.rule}")
        if exp.learner.name in ("scaffold", "feddyn"):
            problems.append(f"server_steps: centered_clip replaces the updates the {exp.learner.name} server half reads; use learner local or fedprox")
    for bound in ("clip_updates", "norm_bound"):
        if bound in names and exp.learner.name == "scaffold":
            problems.append(
                f"server_steps: {bound} bounds the norm of a client's whole payload, and a scaffold payload also holds "
                "its control deltas (gradient-sized, not update-sized), which would dominate the norm and be rescaled "
                "apart from the client's own c_i; use learner local, fedprox or feddyn with it (a robust rule bounds "
                "scaffold's control deltas: aggregators/scaffold.py)"
            )
    own_clip = exp.aggregator.rule == "clipped_clustering" and exp.aggregator.params().get("clip", "round") == "round"
    if "history_clip" in names and own_clip:
        problems.append("server_steps: history_clip clips the updates to the median of every norm seen, and "
                        "clipped_clustering with clip: round would clip them again to this round's median; set "
                        "aggregator.clip: none (the paper's ClippedClustering)")
    if "backdoor_asr" in names and exp.model.task != "text_classification":
        problems.append(f"server_steps: backdoor_asr measures a classification backdoor; model.task is {exp.model.task}")
    if "fedfa" in names and exp.learner.name in ("scaffold", "feddyn"):
        problems.append(f"server_steps: fedfa scores an update against the model it changes; a {exp.learner.name} payload "
                        "carries the learner's own tensors too: use learner local or fedprox")
    return problems
