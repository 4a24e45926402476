"""Config-time checks for heterogeneous clients (HetLoRA, FlexLoRA, FedRA, split learning).

Each returns messages that name the setting and give the numbers; ``components.
combination_problems`` adds them to the config's errors before any data or model loads.
"""

from __future__ import annotations

RANK_LEARNERS = ("hetlora", "flexlora")
SPLIT_LEARNERS = ("split", "splitfed")
# Tuners whose soft prompt or prefix enters through the model's own (wrapped) forward; the
# split learners run the client half from ``bert.embeddings`` and the layers directly
# (``learners/split.py`` ``client_forward``), so the prompt would never be used or trained.
PROMPT_METHODS = ("prompt_tuning", "prefix_tuning", "p_tuning", "personal_prompt", "diprompt", "fedapt")


def _ranked_roles(exp) -> list[tuple[str, object]]:
    return [(r.name, r.profile.get("rank")) for r in exp.federation.roles if "rank" in r.profile]


def hetero_config_problems(exp) -> list[str]:
    from fedfm.runtime.capacity import profile_problems

    name = exp.learner.name
    problems: list[str] = []
    ranked = name in RANK_LEARNERS and exp.peft.method == "lora"  # rank is checked against peft.r below
    for role in exp.federation.roles:
        problems += profile_problems(role.profile, f"federation.roles '{role.name}'", skip=("rank",) if ranked else ())
    if name in RANK_LEARNERS:
        if exp.peft.method != "lora":
            problems.append(
                f"learner.name {name} truncates and pads LoRA factors: it needs peft.method lora, not {exp.peft.method}"
            )
        else:
            r_max = int(exp.peft.params().get("r", 8))
            for role, rank in _ranked_roles(exp):
                if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= r_max:
                    problems.append(
                        f"federation.roles '{role}': profile.rank {rank!r} must be an integer in 1..peft.r ({r_max}); "
                        "the one base model carries LoRA at the largest rank"
                    )
    if name == "flexlora":
        from fedfm.aggregators.server_opt import not_as_is

        got = not_as_is(exp.server_optimizer)
        if got is not None:
            problems.append(
                f"learner.name flexlora replaces the global factors by the SVD of the aggregated B A each round: "
                f"server_optimizer must be sgd with lr 1.0 (got {got})"
            )
    if name == "split" and exp.model.task != "text_classification":
        problems.append(f"learner.name split runs BERT-family sequence classifiers: model.task is {exp.model.task}")
    if name in SPLIT_LEARNERS and exp.peft.method in PROMPT_METHODS:
        problems.append(
            f"learner.name {name} runs the model in two halves, from bert.embeddings through the layers: "
            f"peft.method {exp.peft.method} inserts its soft prompt or prefix in the model's own forward, which the "
            "split never calls, so the prompt would get no gradient; use a tuner inside the layers (lora, adapter, ia3, bitfit, full)"
        )
    problems += splitfed_problems(exp)
    problems += cross_client_step_problems(exp)
    return problems


# Learners whose clients send differently named (fedra: the allocated layers) or shaped
# (hetlora, flexlora: factors truncated to the client's rank) payloads in one round.
PER_CLIENT_PAYLOAD = ("fedra", "hetlora", "flexlora")
# Server steps that line every update of a round up name by name (stacking, or the first
# update's names): centered clipping, FedFA's outlier scores, the omniscient attacks' honest
# mean and std, cluster_report's clustering of the updates.
CROSS_CLIENT_STEPS = ("centered_clip", "fedfa", "alie", "ipm")


def cross_client_step_problems(exp) -> list[str]:
    """A step of ``CROSS_CLIENT_STEPS`` with a learner of ``PER_CLIENT_PAYLOAD``: the first
    round whose clients send different names or shapes stopped the run on a bare KeyError
    (or a stack of unequal sizes)."""
    name = exp.learner.name
    if name not in PER_CLIENT_PAYLOAD:
        return []
    problems = []
    for i, spec in enumerate(exp.server_steps):
        step = spec.get("name")
        if step in CROSS_CLIENT_STEPS or (step == "cluster_report" and spec.get("source", "meta") == "updates"):
            what = "allocated layers" if name == "fedra" else "LoRA rank"
            problems.append(f"server_steps[{i}] ({step}) lines up every update of a round name by name, but learner {name}'s "
                            f"clients send the tensors of their own {what}, so the updates differ in names or shapes; "
                            f"remove it, or use a learner whose clients all send the whole State")
    return problems


def splitfed_problems(exp) -> list[str]:
    """learner ``splitfed`` and exchange ``splitfed`` only work together (learners/splitfed.py)."""
    names = [str(e.get("name")) for e in exp.exchanges]
    learner = exp.learner.name == "splitfed"
    if not learner and "splitfed" not in names:
        return []
    if not learner:
        return [f"exchanges splitfed runs the split steps of learner.name splitfed, not {exp.learner.name}"]
    if "splitfed" not in names:
        return ["learner.name splitfed needs its split steps: add exchanges: [{name: splitfed, steps: N}]"]
    problems = []
    if names != ["splitfed"]:
        problems.append(f"exchanges splitfed replaces the round's updates at its end: it cannot run beside {[n for n in names if n != 'splitfed']}")
    if exp.model.task != "text_classification":
        problems.append(f"learner.name splitfed runs BERT-family sequence classifiers: model.task is {exp.model.task}")
    if exp.peft.local:
        problems.append(f"learner.name splitfed sends every trainable tensor to one half or the other: peft.local {list(exp.peft.local)} must be empty")
    with_mw = [r.name for r in exp.federation.roles if r.middleware]
    if with_mw:
        problems.append(f"learner.name splitfed: client middleware (roles {with_mw}) would only see the train phase's empty update")
    return problems
