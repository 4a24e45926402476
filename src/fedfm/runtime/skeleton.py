"""`fedfm check`'s model: the experiment's model and tuner built on torch's meta device.

Some mistakes in a config show only against the model's parameter names: a
``peft.target_modules`` or ``peft.exclude`` pattern that matches no module, a tuner that
leaves nothing trainable, ``peft.local`` patterns that keep every parameter at home, a
``learner.prune`` pattern that matches no weight, a client rank or layer count that the
model cannot hold. ``fedfm run`` meets them once the weights are loaded. ``fedfm check``
builds the same model from its config on the meta device (names and shapes, no storage:
the pre-trained weights are not read and no memory is taken), applies the tuner as the workbench does
(``runtime/workbench.py``), and asks the algorithm what it asks at the start of a run:
the shared and local split, and every client's downlink shapes (``down_reference``),
which is where per-client shapes and the pruning masks' names are worked out; for the
``split`` learner, which has no server half, every client's ``cut`` against the layers;
for ``fedra``'s sub-models, the layer stack they are cut from; for the batched transport,
that its per-example adapters serve every trainable tensor; and ``runtime.device``
against this machine (a local run's device).

A ``model.init_from`` run (and the runs it started from) is loaded into it as ``run``
loads it (``personalize/init_from.py``): its final State is read, so a missing or
unfinished run, adapter tensors and shapes that differ from the model's are refused here.

What it does not cover: anything computed from the weights' values (SLoRA's SVD of an
``init_from`` run's update, the first pruning masks) and the server's own
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


def skeleton_model(exp, init_from: bool = True) -> torch.nn.Module:
    """The tuned model of ``exp`` on the meta device (its config, the tuner applied);
    ``init_from=False`` skips ``model.init_from`` (a later stage's, which an earlier stage
    of the same file writes)."""
    from fedfm.learners.unpad import unpad_problem

    model_dir(exp.model)  # a package resolved (a GGUF converted once) outside the meta device
    spec = exp.model.model_copy(update={"init": "random"})  # from the config: no weights read
    with torch.device("meta"):
        model, _ = build_task(exp.model.task).build(spec, exp.seed)
        if init_from and exp.model.init_from:  # names and shapes of the earlier runs' States against the model
            from fedfm.personalize.init_from import load_earlier, load_init

            load_earlier(model, exp.model.init_from)
            load_init(model, exp.model.init_from, chain=False)
        for field, on in (("train.unpad", exp.train.unpad), ("eval.unpad", exp.eval.unpad)):
            problem = unpad_problem(model, field) if on else None
            if problem is not None:
                raise ValueError(f"model '{exp.model.package or exp.model.path}': {problem}")
        return apply_tuner(model, exp.peft, exp.model.task)


def meta_state(model: torch.nn.Module) -> State:
    """The trainable State's names, shapes and dtype (float32, as ``peft.get_state``), on meta."""
    return {n: p.detach().to(torch.float32) for n, p in model.named_parameters() if p.requires_grad}


def check_against_model(exp, algorithm, client_ids, init_from: bool = True) -> int:
    """Raise what ``fedfm run`` would raise about names and shapes (see the module
    docstring); returns the number of trainable tensors."""
    model = skeleton_model(exp, init_from)
    state = meta_state(model)
    algorithm.bind_model(model)
    algorithm.shared_part(state)
    for cid in client_ids:
        algorithm.down_reference(cid, state)
    if exp.learner.name == "split":  # its cut is resolved on the client, against the model (no server part)
        from fedfm.learners.split import check_cuts

        check_cuts(model, {cid: algorithm.profiles.get(cid, {}) for cid in client_ids})
    if exp.learner.name == "fedra" and exp.learner.params().get("forward", "allocated") == "allocated":
        from fedfm.learners.fedra import check_stack

        check_stack(model)
    if exp.runtime.transport == "batched":  # the trainable tensors its per-example adapters can serve
        from fedfm.peft.multi_lora import AdapterBatch

        try:
            AdapterBatch(model, list(state))
        except NotImplementedError as exc:
            raise ValueError(f"runtime.transport: batched: {exc}") from None
    if exp.runtime.backend == "local":  # a Flower run's device is its clients' machines'
        from fedfm.runtime.device import resolve_device

        resolve_device(exp.runtime.device)
    return len(state)
