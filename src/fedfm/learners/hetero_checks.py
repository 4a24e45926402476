"""Config-time checks for heterogeneous clients (HetLoRA, FlexLoRA, FedRA, split learning).

Each returns messages that name the setting and give the numbers; ``components.
combination_problems`` adds them to the config's errors before any data or model loads.
"""

from __future__ import annotations

RANK_LEARNERS = ("hetlora", "flexlora")


def _ranked_roles(exp) -> list[tuple[str, object]]:
    return [(r.name, r.profile.get("rank")) for r in exp.federation.roles if "rank" in r.profile]


def hetero_config_problems(exp) -> list[str]:
    name = exp.learner.name
    problems: list[str] = []
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
        so = exp.server_optimizer
        lr = so.params().get("lr", 1.0)
        if so.name != "sgd" or lr != 1.0:
            problems.append(
                f"learner.name flexlora replaces the global factors by the SVD of the aggregated B A each round: "
                f"server_optimizer must be sgd with lr 1.0 (got {so.name}, lr {lr})"
            )
    if name == "split" and exp.model.task != "text_classification":
        problems.append(f"learner.name split runs BERT-family sequence classifiers: model.task is {exp.model.task}")
    return problems
