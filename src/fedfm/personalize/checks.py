"""Config-time refusals of the personalization components (``components.combination_problems``)."""

from __future__ import annotations

# Server steps at stage ``updates`` that pass every payload tensor on as it is (they read
# metrics, metadata or sizes, or drop whole updates); every other one rescales, noises,
# crafts or re-weights payload tensors.
PAYLOAD_KEEPING_STEPS = ("cluster_report", "dp_sgd_accountant", "non_state_payload", "sim_clock")
# Client middleware that leaves the payload tensors as trained (it acts on the examples,
# the timing, or breaks the update on purpose so that validation rejects it).
PAYLOAD_KEEPING_MIDDLEWARE = ("backdoor", "corrupt", "delay", "label_flip")
NORM_STEPS = ("dp_clip", "clip_updates", "norm_bound", "centered_clip")
DP_STEPS = ("dp_clip", "dp_noise")


def plain_mean_problem(exp, learner: str) -> str | None:
    """Learners that move K cluster models by their members' weighted mean (``ifca``,
    ``update_clusters``) hand cluster 0's mean to the server optimizer and apply the
    others directly: only FedAvg with a plain ``sgd`` step of lr 1 treats them alike."""
    if exp.aggregator.rule != "fedavg":
        return f"learner {learner}: aggregates each cluster by its weighted mean; aggregator.rule '{exp.aggregator.rule}' would apply to cluster 0 only"
    from fedfm.aggregators.server_opt import not_as_is

    got = not_as_is(exp.server_optimizer)
    if got is not None:
        return f"learner {learner}: needs server_optimizer sgd with lr 1, not {got} (clusters 1..K-1 are moved by their plain mean)"
    return None


def _ifca_step_reason(name: str, stage: str) -> str | None:
    if stage == "delta":
        why = "works on the combined delta of cluster 0 only; clusters 1..K-1 are moved by their plain mean without it"
        if name == "dp_noise":
            why += " (central noise would reach cluster 0 only while its epsilon is reported for every model)"
        return why
    if stage == "model":
        return "works on cluster 0's model ('model') only, not on the cluster models model.1 .. model.<K-1>"
    if name in PAYLOAD_KEEPING_STEPS:
        return None
    weight = "the payload carries the cluster weight 'ifca/weight' (the example count) beside the delta"
    if name in NORM_STEPS:
        return (f"rescales each update to a norm bound, and {weight}: the weight counts in the norm and is scaled "
                "with it (a delta of norm 0.1 with weight 200 is scaled by 1/400 at a bound of 0.5)")
    if name in ("alie", "ipm"):
        return (f"crafts every payload tensor, and {weight}: the crafted weight is not one positive entry, "
                "so the aggregation would refuse the round")
    return (f"changes the payload tensors (only {', '.join(PAYLOAD_KEEPING_STEPS)} pass them on as they are), "
            f"and {weight}: it would be treated as a model coordinate")


def ifca_payload_problems(exp) -> list[str]:
    """IFCA sends its cluster weight inside the payload and moves clusters 1..K-1 outside the
    server pipeline: server steps that work on the delta or the model see cluster 0 only,
    and steps or client middleware that change payload tensors change the weight too."""
    if exp.learner.name != "ifca":
        return []
    from fedfm.aggregators.pipeline import build_step

    found = []
    for i, spec in enumerate(exp.server_steps):
        try:
            step = build_step(spec, f"server_steps[{i}]")
        except (ValueError, KeyError):
            continue  # the server step's own check reports it
        why = _ifca_step_reason(step.name, step.stage)
        if why is not None:
            found.append(f"learner ifca: server_steps[{i}] '{step.name}' (stage {step.stage}) {why}")
    for i, role in enumerate(exp.federation.roles):
        for j, spec in enumerate(role.middleware):
            name = spec.get("name") if isinstance(spec, dict) else None
            if name is not None and name not in PAYLOAD_KEEPING_MIDDLEWARE:
                found.append(f"learner ifca: federation.roles[{i}].middleware[{j}] '{name}' changes the payload tensors, "
                             "and the payload carries the cluster weight 'ifca/weight' (the example count): it would "
                             "be scaled or noised as a model coordinate")
    return found


def diprompt_dp_problems(exp) -> list[str]:
    """Client-level DP bounds each client's influence on the mean of n equally weighted,
    clipped updates (C / n). DiPrompT's server weights each domain prompt by the inputs the
    clients report in their metadata (``diprompt.counts``), over the clients that trained
    it only: ``dp_clip`` sets the example weight to 1 but not those counts, so one client
    can move a domain prompt by up to C (the only client that trained it) while the noise
    is sized for C / n."""
    if exp.learner.name != "diprompt":
        return []
    found = [f"learner diprompt: server_steps[{i}] '{s['name']}': the domain prompts are averaged with the clients' "
             "own input counts over the clients that trained each prompt, so one client's influence on a domain "
             "prompt is not bounded by C / n and the noise is too small for the reported epsilon"
             for i, s in enumerate(exp.server_steps) if isinstance(s, dict) and s.get("name") in DP_STEPS]
    for i, role in enumerate(exp.federation.roles):
        for j, spec in enumerate(role.middleware):
            if isinstance(spec, dict) and spec.get("name") == "dp_client_noise":
                found.append(f"learner diprompt: federation.roles[{i}].middleware[{j}] 'dp_client_noise': the domain "
                             "prompts are averaged with the clients' own input counts over the clients that trained "
                             "each prompt, so the clients' noise shares do not add up to the accounted noise")
    return found


def personalize_problems(exp) -> list[str]:
    from fedfm.personalize.feddat import feddat_config_problem
    from fedfm.personalize.ifca import ifca_config_problem
    from fedfm.personalize.fedapt import fedapt_config_problem
    from fedfm.personalize.diprompt import diprompt_config_problem
    from fedfm.personalize.fedbfpt import fedbfpt_config_problem
    from fedfm.personalize.update_clusters import update_clusters_config_problems

    found = [feddat_config_problem(exp), ifca_config_problem(exp), fedapt_config_problem(exp), diprompt_config_problem(exp),
             fedbfpt_config_problem(exp)]
    return ([p for p in found if p is not None] + update_clusters_config_problems(exp) + ifca_payload_problems(exp)
            + diprompt_dp_problems(exp))
