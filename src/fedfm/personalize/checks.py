"""Config-time refusals of the personalization components (``components.combination_problems``)."""

from __future__ import annotations


def plain_mean_problem(exp, learner: str) -> str | None:
    """Learners that move K cluster models by their members' weighted mean (``ifca``,
    ``update_clusters``) hand cluster 0's mean to the server optimizer and apply the
    others directly: only FedAvg with a plain ``sgd`` step of lr 1 treats them alike."""
    if exp.aggregator.rule != "fedavg":
        return f"learner {learner}: aggregates each cluster by its weighted mean; aggregator.rule '{exp.aggregator.rule}' would apply to cluster 0 only"
    so = exp.server_optimizer
    if so.name != "sgd" or float(so.params().get("lr", 1.0)) != 1.0 or float(so.params().get("momentum", 0.0)) != 0.0:
        return f"learner {learner}: needs server_optimizer sgd with lr 1 (clusters 1..K-1 are moved by their plain mean)"
    return None


def personalize_problems(exp) -> list[str]:
    from fedfm.personalize.feddat import feddat_config_problem
    from fedfm.personalize.ifca import ifca_config_problem
    from fedfm.personalize.fedapt import fedapt_config_problem
    from fedfm.personalize.diprompt import diprompt_config_problem
    from fedfm.personalize.fedbfpt import fedbfpt_config_problem
    from fedfm.personalize.update_clusters import update_clusters_config_problems

    found = [feddat_config_problem(exp), ifca_config_problem(exp), fedapt_config_problem(exp), diprompt_config_problem(exp),
             fedbfpt_config_problem(exp)]
    return [p for p in found if p is not None] + update_clusters_config_problems(exp)
