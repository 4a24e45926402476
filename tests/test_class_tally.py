"""Balanced accuracy next to accuracy (tasks/class_tally.py), in the classification
tasks' metrics and in the per-client evaluation's row; numbers checkable by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fedfm.codecs.base import Payload
from fedfm.codecs.serialize import to_bytes
from fedfm.core.protocols import Reply
from fedfm.runtime.client_eval import eval_reply_metrics, evaluate_on_clients
from fedfm.tasks.class_tally import ClassTally

ZERO = [1.0, 0.0, 0.0]  # logits that predict class 0


def test_a_one_label_answer_scores_its_share_in_accuracy_and_one_over_labels_balanced():
    tally = ClassTally()
    # two batches, labels 0, 0, 0 | 1 (three of class 0, one of class 1, none of class 2),
    # every example predicted class 0
    tally.add(torch.tensor([ZERO, ZERO, ZERO]), torch.tensor([0, 0, 0]))
    tally.add(torch.tensor([ZERO]), torch.tensor([1]))
    m = tally.metrics()
    assert m["accuracy"] == 0.75  # 3 of 4
    assert m["balanced_accuracy"] == 0.5  # (3/3 + 0/1) / 2: class 2 is not present, not a zero
    lse = math.log(math.e + 2)  # log-sum-exp of [1, 0, 0]
    assert m["loss"] == pytest.approx((3 * (lse - 1) + lse) / 4)


def test_balanced_accuracy_weights_each_label_alike():
    tally = ClassTally()
    # class 0: 1 of 4 right; class 1: 2 of 2 right -> accuracy 3/6, balanced (1/4 + 1) / 2
    one = [0.0, 1.0]
    tally.add(torch.tensor([[1.0, 0.0], one, one, one, one, one]), torch.tensor([0, 0, 0, 0, 1, 1]))
    m = tally.metrics()
    assert m["accuracy"] == 0.5 and m["balanced_accuracy"] == 0.625


def test_nothing_evaluated_gives_no_balanced_accuracy():
    assert ClassTally().metrics() == {"loss": 0.0, "accuracy": 0.0}


def test_the_client_eval_row_carries_the_balanced_mean_and_worst_decile():
    def reply(acc: str, bal: str) -> bytes:
        return to_bytes(Payload({}, {"metric.accuracy": acc, "metric.balanced_accuracy": bal, "metric.loss": "0.5"}))

    assert eval_reply_metrics(reply("0.75", "0.5")) == ({"accuracy": 0.75, "balanced_accuracy": 0.5, "loss": 0.5}, None)
    assert eval_reply_metrics(reply("0.75", "nan"))[1] == "metric.balanced_accuracy is nan"

    class Clients:
        clients = [type("C", (), {"cid": c, "eval_indices": [0]})() for c in range(3)]
        fingerprint = "f"

    given = {0: reply("0.9", "0.5"), 1: reply("0.7", "0.7"), 2: reply("1.0", "1.0")}

    class Transport:
        def exchange(self, envelopes):
            return {e.cid: Reply(e.cid, given[e.cid]) for e in envelopes}

    out = evaluate_on_clients(Transport(), Clients(), "all", 1, {"w": torch.zeros(1)}, [], {})
    assert out["client_accuracy_mean"] == pytest.approx((0.9 + 0.7 + 1.0) / 3)
    assert out["client_balanced_accuracy_mean"] == pytest.approx((0.5 + 0.7 + 1.0) / 3)
    assert out["client_accuracy_worst10"] == 0.7 and out["client_balanced_accuracy_worst10"] == 0.5  # 3 clients: the lowest one
