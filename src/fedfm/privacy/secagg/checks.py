"""Config-time checks of secure aggregation (``exchanges: [{name: secagg}]``), called
from ``fedfm.components.combination_problems`` through ``privacy/checks.py``.

Under secure aggregation the server holds only the weighted mean of the survivors'
updates, so anything that needs the individual updates cannot run and is refused, with
the reason: a rule other than ``fedavg`` (a robust rule ranks, trims or compares single
updates), a server step at stage ``updates`` (except ``dp_noise`` with ``mode:
distributed``, which only counts them), a learner with a server half (SCAFFOLD, FedDyn
and per-client shapes combine individual client tensors), and any uplink codec (the
masked integers must arrive exactly; secure aggregation quantizes itself). The
fixed-point sum of a round must not wrap: neither the values' (n x bound x 2^frac_bits)
nor, with ``weighting: num_examples``, the weights' when ``federation.examples_per_client``
bounds them (n x examples_per_client); when nothing bounds the example counts at config
time, each client refuses at masking time a weight that could make the sum wrap
(``mask.py``).
"""

from __future__ import annotations

from fedfm.privacy.secagg import fixed_point
from fedfm.privacy.secagg.graph import holders
from fedfm.privacy.secagg.params import SecAggParams

INDIVIDUAL_RULES = {
    "median": "the coordinate-wise median of the individual updates",
    "trimmed_mean": "the individual updates sorted per coordinate",
    "krum": "the distances between individual updates",
    "multi_krum": "the distances between individual updates",
    "bulyan": "the distances between individual updates",
    "geometric_median": "the individual updates (Weiszfeld iterations)",
    "clipped_clustering": "the individual updates (clustering)",
}


def _secagg_params(exp) -> list[tuple[int, SecAggParams | None]]:
    out = []
    for i, spec in enumerate(exp.exchanges):
        if isinstance(spec, dict) and spec.get("name") == "secagg":
            try:
                out.append((i, SecAggParams(**{k: v for k, v in spec.items() if k != "name"})))
            except Exception:  # reported by the registry check already
                out.append((i, None))
    return out


def _step_stage(spec) -> str | None:
    from fedfm.aggregators.pipeline import build_step

    try:
        return build_step(spec, "server_steps").stage
    except Exception:  # reported by the registry check already
        return None


def secagg_problems(exp) -> list[str]:
    from fedfm.aggregators.robust_checks import per_round
    from fedfm.aggregators.server_part import server_parts

    found = _secagg_params(exp)
    problems: list[str] = []
    if not found:
        return problems
    if len(found) > 1:
        problems.append("exchanges: secagg is given more than once")
    idx, p = found[0]
    where = f"exchanges[{idx}] (secagg)"
    rule = exp.aggregator.rule
    if rule != "fedavg":
        why = INDIVIDUAL_RULES.get(rule, "the individual updates, not only their weighted mean")
        problems.append(f"aggregator.rule: {rule} needs {why}; under secure aggregation the server holds only the "
                        "weighted mean of the survivors' updates: use fedavg")
    for i, spec in enumerate(exp.server_steps):
        name = spec.get("name") if isinstance(spec, dict) else None
        if name == "dp_noise" and spec.get("mode") == "distributed":
            continue
        if _step_stage(spec) == "updates":
            problems.append(f"server_steps[{i}] ({name}): runs at stage 'updates' on the individual updates, which secure "
                            "aggregation hides from the server (it sees only their sum)")
    if exp.learner.name in server_parts.names():
        problems.append(f"learner.name: {exp.learner.name}'s server half combines individual client tensors, which "
                        "secure aggregation hides from the server")
    if exp.codecs.up:
        names = [next(iter(s)) if "name" not in s else s["name"] for s in exp.codecs.up if isinstance(s, dict) and s]
        problems.append(f"codecs.up: {names} would change the masked integers, which must arrive exactly for the masks "
                        "to cancel; secure aggregation quantizes itself (bound, frac_bits, bits): remove codecs.up")
    if p is None:
        return problems
    n = per_round(exp.federation)
    for j, d in enumerate(p.drop):
        bad = [c for c in d.cids if not 0 <= c < exp.federation.clients]
        if bad:
            problems.append(f"{where}: drop[{j}].cids {bad} outside 0..{exp.federation.clients - 1} (federation.clients "
                            f"{exp.federation.clients})")
        never = [r for r in d.rounds or [] if r < 1]
        if never:
            problems.append(f"{where}: drop[{j}].rounds {never}: rounds count from 1 (round 0 is the evaluation before training)")
    if n < 2:
        problems.append(f"{where}: {n} client per round: the sum of one client's input is that input, which the server "
                        "would then see; secure aggregation needs at least 2 clients per round")
    if p.threshold == 1:
        problems.append(f"{where}: threshold 1 lets a round end with one survivor, whose input the server would then "
                        "see as the sum; use at least 2 (default n - floor(n/3))")
    if p.threshold is not None and p.threshold > n:
        problems.append(f"{where}: threshold {p.threshold} exceeds the {n} clients per round")
    elif p.threshold is not None and p.threshold > holders(n, p.neighbours):
        problems.append(f"{where}: threshold {p.threshold} exceeds the {p.neighbours + 1} holders of each client's shares "
                        f"(itself and its neighbours {p.neighbours})")
    cap = fixed_point.capacity_problem(n, p.bound, p.frac_bits, p.bits)
    if cap is not None:
        problems.append(f"{where}: {cap}")
    most = exp.federation.examples_per_client
    if p.weighting == "num_examples" and most is not None:
        wrap = fixed_point.weight_problem(n, most, p.bits)
        if wrap is not None:
            problems.append(f"{where}: {wrap} (federation.examples_per_client {most}); lower it or use weighting: uniform")
    for r in exp.federation.roles:
        for m in r.middleware:
            if m.get("name") == "dp_client_noise" and float(m.get("clip_norm", 0)) > p.bound:
                problems.append(f"{where}: bound {p.bound} is below role '{r.name}' dp_client_noise clip_norm "
                                f"{m.get('clip_norm')}: clipped updates (and their noise) would be clipped again per coordinate")
    return problems
