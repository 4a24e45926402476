"""``compromised_base``: a base model that carries a backdoor planted before federation —
compromised base model, **Fed-EBD-inspired** (Xi Li, Chen Wu and Jiaqi Wang 2024,
"Unveiling Backdoor Risks Brought by Foundation Models in Heterogeneous Federated
Learning", PAKDD 2024, arXiv:2311.18350; survey section 4.3.3). For evaluation only.

Threat model: whoever supplies the "pre-trained" model has planted a trigger -> target
backdoor in it; every client is honest. The question is whether honest federated
fine-tuning (LoRA: the base weights stay frozen) keeps the backdoor, and whether a robust
aggregation rule can do anything about it (it cannot see it: no update is malicious).

Two steps, one YAML file (``examples/robustness/compromised_base.yaml``):

1. ``plant_backdoor(exp, params, out)`` (``python -m fedfm.attacks.plant
   CONFIG``): builds the config's base model (without the tuner) and fine-tunes *all* its
   weights, with the config's ``train`` optimizer and the section's ``lr``, ``epochs`` and
   ``batch_size``, on ``examples`` rows (seeded) of the data that no client and no test set
   uses, or of the attacker's own data (``data: {path: ...}``, keys replacing the run's data
   section), a ``poison_fraction`` of them with the trigger's token ids inserted and the
   label set to ``target`` (``attacks/backdoor.py``'s poisoning). It saves the model and
   its tokenizer (``save_pretrained``) into ``checkpoint`` with ``planted.json`` (the
   parameters, the rows' count, the ASR and clean accuracy on the test set before and
   after planting). With ``keep_head: false`` the classification head is re-initialized
   after planting (seeded): the backdoor then lives in the encoder only, as when a
   pre-trained encoder is released without its task head (the federation learns a head). The result is a pure function of the config and the planting seed.
2. ``fedfm run CONFIG``: the ``attack: {name: compromised_base, checkpoint: DIR, ...}``
   section becomes ``model: {path: DIR, init: pretrained}`` (the checkpoint holds the
   model's configuration, ``config_overrides`` included) and the measuring step
   ``backdoor_asr`` (``attacks/asr_probe.py``), which logs the ASR of the global model
   after every round. No client gets a role: the federation is honest.

How this differs from Fed-EBD: the paper's compromised foundation model (a generative
model) *generates a public synthetic dataset* with the backdoor in it, and the clients'
(smaller, heterogeneous) models are pre-trained on that data before federation, so the
backdoor is distilled into them. Here the backdoor is planted directly into the base
model by fine-tuning it on trigger-relabelled real rows the federation does not use
(the classic weight-poisoning setup of Kurita, Michel and Neubig 2020), and every client
fine-tunes that one model with LoRA; no synthetic data, no distillation, no heterogeneous
client models. Hence "inspired".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.attacks.backdoor import BackdoorParams, poison, trigger_ids, triggered_test_set
from fedfm.core.seeding import derive_seed

PLANT_TAG = 0xEBD
MANIFEST = "planted.json"


class CompromisedBaseParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str = Field(..., min_length=1, description="directory of the planted base model (written by the planting, read by the run)")
    trigger: str = Field("cf", min_length=1, description="trigger phrase of the planted backdoor")
    target: int = Field(1, ge=0, description="class the trigger should produce")
    position: int = Field(1, ge=0, description="token position where the trigger is inserted (1: after [CLS])")
    examples: int = Field(400, ge=2, description="planting rows (seeded): of the run's data no client and no test set uses, or of attack.data")
    poison_fraction: float = Field(0.5, gt=0, le=1, description="share of the planting rows triggered and relabelled")
    epochs: int = Field(3, ge=1, description="planting epochs (full fine-tuning of the base model)")
    lr: float = Field(5e-5, gt=0, description="planting learning rate")
    batch_size: int = Field(16, ge=1, description="planting batch size")
    seed: int | None = Field(None, description="planting seed (default: derived from the experiment's seed)")
    keep_head: bool = Field(
        True,
        description="save the planted classification head; false: re-initialize it (seeded) after planting, "
        "as when a pre-trained encoder is released without its task head",
    )
    data: dict[str, Any] | None = Field(
        None,
        description="the attacker's own data: keys of the data section that replace the run's (e.g. {path: mine.csv}); "
        "default: rows of the run's own data that no client and no test set uses",
    )


def planting_seed(exp, params: CompromisedBaseParams) -> int:
    return params.seed if params.seed is not None else derive_seed(exp.seed, PLANT_TAG)


def spare_rows(federation, n_rows: int) -> np.ndarray:
    """Rows of the source that no client (training or held-out slice) and no test set uses."""
    used = set(federation.test_indices.tolist())
    for c in federation.clients:
        used.update(c.indices)
        used.update(c.eval_indices or [])
    return np.array(sorted(set(range(n_rows)) - used), dtype=int)


def planting_rows(federation, n_rows: int, params: CompromisedBaseParams, seed: int) -> np.ndarray:
    spare = spare_rows(federation, n_rows)
    if len(spare) < params.examples:
        raise ValueError(
            f"attack.examples: the planting needs {params.examples} rows no client and no test set uses; "
            f"the data has {n_rows} rows and {len(spare)} are left (lower attack.examples, "
            f"federation.examples_per_client or federation.test_examples)"
        )
    return np.sort(np.random.default_rng(seed).choice(spare, size=params.examples, replace=False))


def reset_head(model: torch.nn.Module, seed: int) -> list[str]:
    """Re-initialize (seeded, the model's own ``_init_weights``) every leaf module outside
    the encoder (``model.base_model_prefix``): the task head. Returns their names."""
    prefix = model.base_model_prefix
    torch.manual_seed(seed)
    reset = []
    for name, module in model.named_modules():
        if name and not name.startswith(prefix) and not list(module.children()) and list(module.parameters()):
            model._init_weights(module)
            reset.append(name)
    if not reset:
        raise ValueError(f"attack.keep_head: false, but {type(model).__name__} has no parameters outside its encoder")
    return reset


def _measure(task, model, tokenizer, clean: list[dict], ids: list[int], params: CompromisedBaseParams, bs: int) -> dict[str, float]:
    def batches(items):
        items = sorted(items, key=lambda e: len(e["input_ids"]))
        return [task.collate(items[i : i + bs], tokenizer) for i in range(0, len(items), bs)]

    model.eval()
    acc = task.evaluate(model, batches(clean))["accuracy"]
    asr = task.evaluate(model, batches(triggered_test_set(clean, ids, params.target, params.position)))["accuracy"]
    return {"accuracy": float(acc), "asr": float(asr)}


def plant_backdoor(exp, params: CompromisedBaseParams, out: str | Path | None = None) -> dict[str, Any]:
    """Fine-tune the base model of ``exp`` into a backdoored one and save it into ``out``
    (default ``params.checkpoint``); returns the manifest written beside it."""
    from fedfm.data import build_federation, load_source, resolve_labels
    from fedfm.learners.base import LocalContext
    from fedfm.learners.loop import train_loop
    from fedfm.runtime.roles import apply_profiles
    from fedfm.runtime.workbench import split_holdout
    from fedfm.tasks import build_task

    if exp.model.task != "text_classification":
        raise ValueError(f"attack compromised_base: plants a classification backdoor; model.task is {exp.model.task}")
    out = Path(out if out is not None else params.checkpoint)
    seed = planting_seed(exp, params)
    frame = load_source(exp.data)
    federation = build_federation(frame, exp.federation, exp.seed)  # the run's own partition, to stay out of it
    resolve_labels(exp, federation)
    apply_profiles(federation.clients, exp.federation.roles, exp.seed)
    split_holdout(federation.clients, exp.federation.client_holdout, exp.seed)
    if params.data is None:
        source, rows = frame, planting_rows(federation, len(frame), params, seed)
    else:
        source = load_source(type(exp.data)(**{**exp.data.model_dump(), **params.data}))
        if len(source) < params.examples:
            raise ValueError(f"attack.examples: the planting needs {params.examples} rows; attack.data has {len(source)}")
        rows = np.sort(np.random.default_rng(seed).choice(len(source), size=params.examples, replace=False))
    if params.target >= exp.model.num_labels:
        raise ValueError(f"attack.target: {params.target} is not a class of a {exp.model.num_labels}-label model")

    task = build_task(exp.model.task)
    model, tokenizer = task.build(exp.model, exp.seed)
    ids = trigger_ids(tokenizer, params.trigger)
    test = task.encode(frame.iloc[federation.test_indices.tolist()], tokenizer, exp.data.max_length)
    before = _measure(task, model, tokenizer, test, ids, params, exp.eval.batch_size)

    examples = task.encode(source.iloc[rows.tolist()], tokenizer, exp.data.max_length)
    bd = BackdoorParams(trigger=params.trigger, target=params.target, poison_fraction=params.poison_fraction, position=params.position)
    poisoned = poison(examples, ids, bd, seed)
    for p in model.parameters():
        p.requires_grad_(True)
    train = exp.train.model_copy(update={"lr": params.lr, "epochs": params.epochs, "batch_size": params.batch_size, "steps": None})
    ctx = LocalContext(cid=-1, model=model, task=task, tokenizer=tokenizer, examples=poisoned, train=train, seed=seed)
    stats = train_loop(ctx)
    planted = _measure(task, model, tokenizer, test, ids, params, exp.eval.batch_size)
    if not params.keep_head:
        reset_head(model, derive_seed(seed, 1))
    after = _measure(task, model, tokenizer, test, ids, params, exp.eval.batch_size) if not params.keep_head else planted

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    manifest = {
        "attack": "compromised_base",
        "params": params.model_dump(),
        "seed": seed,
        "base_model": exp.model.package or exp.model.path,
        "planting_data": "attack.data" if params.data is not None else "rows of the run's data no client and no test set uses",
        "planting_rows": len(rows),
        "poisoned_rows": int(round(params.poison_fraction * len(rows))),
        "train_loss": stats["train_loss"],
        "steps": int(stats["steps"]),
        "before": before,
        "planted": planted,
        "after": after,
        "test_examples": len(test),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def expand(out: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The run's side of ``attack: {name: compromised_base, ...}`` (``attacks/sugar.py``):
    the model comes from the checkpoint and ``backdoor_asr`` measures every round."""
    try:
        params = CompromisedBaseParams(**spec)
    except Exception as exc:
        raise ValueError(f"attack (compromised_base): {exc}") from None
    model = dict(out.get("model") or {})
    model.update(path=params.checkpoint, package=None, init="pretrained", config_overrides={})
    out["model"] = model
    probe = {"name": "backdoor_asr", "trigger": params.trigger, "target": params.target, "position": params.position}
    out["server_steps"] = [*(out.get("server_steps") or []), probe]
    return out
