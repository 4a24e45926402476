"""``label_flip``: data poisoning by flipped labels (e.g. Tolpegin, Truex, Gursoy and Liu
2020, "Data Poisoning Attacks Against Federated Learning Systems"), client middleware
(``before_train``).

Every example's label ``y`` becomes ``num_labels - 1 - y`` (for two classes: 0 <-> 1), or
``target`` for every example when ``target`` is given. ``num_labels`` is the model's
(``model.num_labels``). Examples are the task's encoded dicts; a task without a ``label``
key (causal LM) is refused with the client's id.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from fedfm.attacks.checks import check_target, model_classes
from fedfm.learners.middleware import PassThrough, register_middleware


class LabelFlipParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: int | None = Field(None, ge=0, description="relabel everything to this class instead of y -> C - 1 - y")


def model_num_labels(ctx) -> int:
    n = model_classes(ctx)
    if n is None:
        raise ValueError(f"client {ctx.cid}: label_flip needs a classification model with num_labels")
    return n


def flip_labels(examples: list[dict], num_labels: int, target: int | None, cid: int) -> list[dict]:
    out = []
    for e in examples:
        if "label" not in e:
            raise ValueError(f"client {cid}: label_flip needs examples with a 'label' (text classification)")
        out.append({**e, "label": target if target is not None else num_labels - 1 - int(e["label"])})
    return out


class LabelFlip(PassThrough):
    name = "label_flip"

    def __init__(self, params: LabelFlipParams):
        self.target = params.target

    def before_train(self, examples, ctx):
        num_labels = model_num_labels(ctx)
        check_target(self.target, num_labels, "label_flip", ctx.cid)
        return flip_labels(examples, num_labels, self.target, ctx.cid)


register_middleware("label_flip", LabelFlip, LabelFlipParams)
