"""Config-time checks of learner settings that validate but are known not to work.

Each check takes an experiment (``fedfm.config.Experiment``) and returns a message that
says what is wrong and why, or None. They read the learner's parameters through its
registered schema, so a default that changes in the learner changes the check with it.

``scaffold_config_problem``: SCAFFOLD's option II (``control_update: delta``) sets ``c_i+ = c_i - c + (x - y)/(K lr)``. That is the mean of the K raw
minibatch gradients only under plain SGD; with AdamW each step moves a coordinate by about
``lr`` whatever the gradient's size, so ``(x - y)/(K lr)`` is of order 1 per coordinate,
far above the gradients it is meant to correct. Measured in docs/algorithms.md: on the
tiny test model FedAvg reached accuracy 0.975, SCAFFOLD with ``delta`` stayed at chance
(0.475) and with ``mean_grad`` reached 0.95. SGD with momentum fails the same way, less
far: with a constant gradient 1, K = 20 steps of lr 0.1 and momentum 0.9, ``(x - y)/(K lr)``
is 6.05, not 1. So ``delta`` is refused with AdamW and with ``train.momentum > 0``. (SGD's
``weight_decay`` makes ``delta`` the mean gradient of the decayed objective, ``mean_grad``
that of the loss alone; both are accepted.)
"""

from __future__ import annotations

from fedfm.core.registry import RegistryError
from fedfm.learners.base import learners


def scaffold_config_problem(exp) -> str | None:
    """Why this experiment's SCAFFOLD settings will not converge, or None."""
    spec = exp.learner
    if spec.name != "scaffold":
        return None
    given = spec.params()
    try:
        params = learners.parse("scaffold", given, "learner")
    except RegistryError:
        return None  # the learner section's own check reports it, in the config error's list
    if params.control_update != "delta":
        return None
    origin = "" if "control_update" in given else " (the default)"
    if exp.train.optimizer == "sgd" and exp.train.momentum > 0:
        return (
            f"learner.control_update: 'delta'{origin} with train.momentum {exp.train.momentum}: option II sets c_i "
            "from (x - y)/(K lr), which momentum inflates (constant gradient 1, 20 steps, momentum 0.9: 6.05 "
            "instead of 1); use learner: {name: scaffold, control_update: mean_grad}, or train.momentum: 0"
        )
    if exp.train.optimizer != "adamw":
        return None
    return (
        f"learner.control_update: 'delta'{origin} with train.optimizer: adamw does not converge: "
        "option II sets c_i from (x - y)/(K lr), the mean AdamW step divided by lr, which is of "
        "order 1 per coordinate, far above the gradients the control variates correct "
        "(docs/algorithms.md: accuracy stayed at chance where FedAvg learned). Use "
        "learner: {name: scaffold, control_update: mean_grad} (the mean of the raw local "
        "gradients, the same as option II under plain SGD), or train.optimizer: sgd."
    )
