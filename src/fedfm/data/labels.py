"""Class labels checked against the model before it loads.

A classifier's head has ``model.num_labels`` outputs and the data's labels are class ids
0..C-1 (data/sources.py maps named labels to ids). A label the head cannot express ends
in an index error deep inside training, and a set with a single class trains to a
perfect-looking accuracy. So, before the model loads:

- ``model.num_labels`` unset: inferred from the data (the number of names a source gave,
  else the largest id + 1);
- ``model.num_labels`` set: every label must be below it; the error names the labels found;
- warnings for a training set, a test set or a client that holds one class only.

The label-to-id mapping is what a later user of final.safetensors needs to read its
outputs: ``fedfm data describe`` shows it and ``fedfm run`` saves it as labels.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

# Tasks whose rows carry class ids: a classifier's head, or a causal LM's label words.
LABEL_TASKS = ("text_classification", "lm_classification")
SHOWN = 10  # labels listed in a message before "... (N in all)"


@dataclass
class Labels:
    """What the data's labels are and what they mean."""

    mapping: dict[str, int]  # label name -> class id
    num_labels: int
    warnings: list[str] = field(default_factory=list)


def label_names(frame: pd.DataFrame) -> list[str]:
    """Names by class id: the source's names, else the ids themselves (0..max)."""
    names = frame.attrs.get("label_names")
    if names:
        return [str(n) for n in names]
    if "label" not in frame.columns or len(frame) == 0:
        return []
    return [str(i) for i in range(int(frame["label"].max()) + 1)]


def _listed(values: list[Any]) -> str:
    shown = ", ".join(str(v) for v in values[:SHOWN])
    return shown + (f", ... ({len(values)} in all)" if len(values) > SHOWN else "")


def _named(ids: list[int], names: list[str]) -> list[str]:
    return [names[i] if i < len(names) and names[i] != str(i) else str(i) for i in ids]


def single_class(fed, names: list[str], partitioner: str | None = None) -> list[str]:
    """Warnings for the training set, the test set and each client holding one class only.

    The hint about ``subsample`` is for the natural partitioner (or an unknown one); under
    a label-skew partitioner (dirichlet, shards) a one-class client is its skew."""
    frame, out = fed.frame, []
    labels = frame["label"].to_numpy()
    train = np.unique(labels[[i for c in fed.clients for i in c.indices]])
    if len(train) == 1:
        out.append(f"the training set holds one class only (label {_named(train.tolist(), names)[0]}): nothing to learn")
    test = np.unique(labels[fed.test_indices])
    if len(test) == 1:
        out.append(
            f"the test set holds one class only (label {_named(test.tolist(), names)[0]}): its accuracy only "
            f"says how often the model predicts that class"
        )
    lonely = [(c.cid, np.unique(labels[c.indices])) for c in fed.clients]
    lonely = [(cid, ys) for cid, ys in lonely if len(ys) == 1]
    if lonely and (len(train) > 1 or len(fed.clients) > 1):
        which = ", ".join(f"client {cid} (label {_named(ys.tolist(), names)[0]})" for cid, ys in lonely[:SHOWN])
        if partitioner in (None, "natural"):
            hint = (
                "With the natural partitioner and examples_per_client on a file sorted by label, set "
                "federation.partitioner.subsample: random (or stratified)"
            )
        else:
            hint = f"This is the label skew of federation.partitioner '{partitioner}'; use iid if it is not meant"
        out.append(f"{len(lonely)} of {len(fed.clients)} clients hold one class only: {which}. {hint}")
    return out


def check_labels(fed, num_labels: int | None, where: str = "the data", partitioner: str | None = None) -> Labels:
    """The mapping and the number of classes, checked against ``num_labels`` when given."""
    frame = fed.frame
    names = label_names(frame)
    found = sorted(int(v) for v in frame["label"].unique())
    if num_labels is None:
        num_labels = max(len(names), 1)
    elif found and found[-1] >= num_labels:
        shown = _listed(_named(found, names))
        raise ValueError(
            f"model.num_labels={num_labels}, but {where} has {len(found)} labels: {shown} "
            f"(class ids up to {found[-1]}); set model.num_labels: {max(found[-1] + 1, len(names))} "
            f"or leave it out to infer it from the data"
        )
    mapping = {name: i for i, name in enumerate(names)}
    warnings = single_class(fed, names, partitioner)
    if num_labels == 1:
        warnings.append("model.num_labels is 1: a one-class classifier learns nothing")
    return Labels(mapping=mapping, num_labels=num_labels, warnings=warnings)


def resolve_labels(exp, fed) -> Labels | None:
    """Check the labels of a classification experiment and fill in ``model.num_labels``.

    None when the task has no class labels (causal LM). Call it after the federation is
    built and before the model loads; it sets ``exp.model.num_labels`` when it was unset.
    """
    if exp.model.task not in LABEL_TASKS or "label" not in fed.frame.columns:
        return None
    where = f"data.path {exp.data.path}" if exp.data.path else f"data.source '{exp.data.source}'"
    labels = check_labels(fed, exp.model.num_labels, where, exp.federation.partitioner.name)
    if exp.model.num_labels is None:
        exp.model.num_labels = labels.num_labels
    return labels
