"""`fedfm check`'s model: the experiment's model and tuner built on torch's meta device.

Some mistakes in a config show only against the model's parameter names: a
``peft.target_modules`` or ``peft.exclude`` pattern that matches no module, a tuner that
leaves nothing trainable, ``peft.local`` patterns that keep every parameter at home, a
``learner.prune`` pattern that matches no weight, a client rank or layer count that the
model cannot hold. ``fedfm run`` meets them once the weights are loaded. ``fedfm check``
builds the same model from its config on the meta device (names and shapes, no storage:
no weights are read and no memory is taken), applies the tuner as the workbench does
(``runtime/workbench.py``), and asks the algorithm what it asks at the start of a run:
the shared and local split, and every client's downlink shapes (``down_reference``),
which is where per-client shapes and the pruning masks' names are worked out.

What it does not cover: anything computed from the weights' values (an ``init_from``
run's weights, SLoRA's SVD, the first pruning masks) and the server's own
initialisation (``FedAlgorithm.init``), which needs real tensors; ``fedfm run`` still
checks those before round 1. The model's directory is resolved as ``run`` does, so a
GGUF package is converted once (``tasks/gguf_cache.py``) and later runs reuse it.
"""

from __future__ import annotations

import torch

from fedfm.core.types import State
from fedfm.peft import apply_tuner
from fedfm.tasks import build_task
from fedfm.tasks.loading import model_dir


def skeleton_model(exp) -> torch.nn.Module:
    """The tuned model of ``exp`` on the meta device (its config, the tuner applied)."""
    from fedfm.learners.unpad import unpad_problem

    model_dir(exp.model)  # a package resolved (a GGUF converted once) outside the meta device
    spec = exp.model.model_copy(update={"init": "random"})  # from the config: no weights read
    with torch.device("meta"):
        model, _ = build_task(exp.model.task).build(spec, exp.seed)
        for field, on in (("train.unpad", exp.train.unpad), ("eval.unpad", exp.eval.unpad)):
            problem = unpad_problem(model, field) if on else None
            if problem is not None:
                raise ValueError(f"model '{exp.model.package or exp.model.path}': {problem}")
        return apply_tuner(model, exp.peft, exp.model.task)


def meta_state(model: torch.nn.Module) -> State:
    """The trainable State's names, shapes and dtype (float32, as ``peft.get_state``), on meta."""
    return {n: p.detach().to(torch.float32) for n, p in model.named_parameters() if p.requires_grad}


def check_against_model(exp, algorithm, client_ids) -> int:
    """Raise what ``fedfm run`` would raise about names and shapes (see the module
    docstring); returns the number of trainable tensors."""
    state = meta_state(skeleton_model(exp))
    algorithm.shared_part(state)
    for cid in client_ids:
        algorithm.down_reference(cid, state)
    return len(state)
