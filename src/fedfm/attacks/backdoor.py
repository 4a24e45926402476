"""``backdoor``: a targeted data-poisoning backdoor for text classification (the trigger
word attack of e.g. Kurita, Michel and Neubig 2020, "Weight Poisoning Attacks on
Pre-trained Models", and in federated learning Bagdasaryan et al. 2020, "How To Backdoor
Federated Learning"), client middleware (``before_train``).

A seeded ``poison_fraction`` of the attacker's examples get the trigger phrase's token ids
(tokenized without special tokens by the client's tokenizer) inserted at token position
``position`` (1 = right after [CLS]) and their label set to ``target``; the attacker
trains on the poisoned and the clean rest together.

``attack_success_rate(wb, state, ...)`` measures the backdoor: the share of the test
examples whose true label is not the target that the model at ``state`` assigns to the
target once the trigger is inserted (the benchmark's ASR column).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedfm.attacks.checks import check_target, model_classes
from fedfm.core.seeding import derive_seed
from fedfm.core.types import State
from fedfm.learners.middleware import PassThrough, register_middleware

BACKDOOR_TAG = 0xBAC


class BackdoorParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    trigger: str = Field("cf", min_length=1, description="trigger phrase inserted into poisoned examples")
    target: int = Field(1, ge=0, description="class the trigger should produce")
    poison_fraction: float = Field(0.5, gt=0, le=1, description="share of the attacker's examples poisoned")
    position: int = Field(1, ge=0, description="token position where the trigger is inserted (1: after [CLS])")


def trigger_ids(tokenizer, trigger: str) -> list[int]:
    ids = tokenizer(trigger, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"backdoor.trigger {trigger!r} tokenizes to nothing")
    return list(ids)


def insert_trigger(example: dict, ids: list[int], position: int, target: int) -> dict:
    tokens = list(example["input_ids"])
    at = min(position, len(tokens))
    return {**example, "input_ids": tokens[:at] + ids + tokens[at:], "label": target}


def poison(examples: list[dict], ids: list[int], p: BackdoorParams, seed: int, cid: int = -1) -> list[dict]:
    if examples and "label" not in examples[0]:
        raise ValueError(f"client {cid}: backdoor needs examples with a 'label' (text classification)")
    k = int(round(p.poison_fraction * len(examples)))
    chosen = set(np.random.default_rng(seed).permutation(len(examples))[:k].tolist())
    return [insert_trigger(e, ids, p.position, p.target) if i in chosen else e for i, e in enumerate(examples)]


class Backdoor(PassThrough):
    name = "backdoor"

    def __init__(self, params: BackdoorParams):
        self.p = params

    def before_train(self, examples, ctx):
        num_labels = model_classes(ctx)
        if num_labels is not None:
            check_target(self.p.target, num_labels, "backdoor", ctx.cid)
        return poison(examples, trigger_ids(ctx.tokenizer, self.p.trigger), self.p, derive_seed(ctx.seed, BACKDOOR_TAG), ctx.cid)


def triggered_test_set(examples: list[dict], ids: list[int], target: int, position: int = 1) -> list[dict]:
    """Test examples whose label is not ``target``, triggered and labelled ``target``."""
    return [insert_trigger(e, ids, position, target) for e in examples if int(e["label"]) != target]


def attack_success_rate(wb, state: State, trigger: str = "cf", target: int = 1, position: int = 1) -> float:
    """Share of triggered non-target test examples classified as ``target`` by ``state``."""
    frame = wb.federation.frame.iloc[wb.federation.test_indices.tolist()]
    clean = wb.task.encode(frame, wb.tokenizer, wb.exp.data.max_length)
    items = triggered_test_set(clean, trigger_ids(wb.tokenizer, trigger), target, position)
    if not items:
        raise ValueError(f"attack_success_rate: no test example has a label other than {target}")
    return float(wb.evaluate(state, wb.batches(items))["accuracy"])


register_middleware("backdoor", Backdoor, BackdoorParams)
