"""train.unpad: padding-free BERT training (learners/unpad.py) gives the padded model's
forward pass bit for bit, with the same dropout masks, and its gradients to float rounding;
with the last layer on the first token only (sequence classification), both to rounding."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from tiny_llm import tiny_llm_config
from fedfm.config import ConfigError, from_dict
from fedfm.learners.unpad import _dropout, unpad_problem, unpadded
from fedfm.runtime import run_local
from fedfm.runtime.workbench import Workbench


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    return Workbench(from_dict(tiny_config(tmp_path_factory.mktemp("unpad"))))


@pytest.fixture
def encode_calls(monkeypatch) -> list[int]:
    """One entry per batch that took the unpadded path (``unpadded._encode``)."""
    calls: list[int] = []
    encode = unpadded._encode
    monkeypatch.setattr(unpadded, "_encode", lambda self, *a: calls.append(1) or encode(self, *a))
    return calls


def _batch():
    # Lengths 7, 3, 5 padded to 7: 15 real tokens of 21 positions.
    lengths = torch.tensor([7, 3, 5])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (3, 7), generator=g)
    mask = (torch.arange(7)[None] < lengths[:, None]).long()
    return ids * mask, mask, torch.tensor([0, 1, 1])


def _step(model, use_unpad: bool, first_token: bool | None = None):
    ids, mask, labels = _batch()
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)  # dropout masks
    if use_unpad:
        with unpadded(model, first_token=first_token):
            logits = model(input_ids=ids, attention_mask=mask).logits
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits
    torch.nn.functional.cross_entropy(logits, labels).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    after = torch.rand(3)  # the generator's state after the forward pass
    model.eval()
    return logits.detach(), grads, after


def test_dropout_draws_the_padded_mask_by_hand():
    # 4 padded rows of 3, rows 0 and 2 real (values 1,2,3 and 7,8,9); p = 0.5: every kept
    # value is doubled (1 / (1 - 0.5) = 2) and the mask is the one nn.Dropout draws on the
    # padded [4, 3] tensor, read at rows 0 and 2.
    drop = torch.nn.Dropout(0.5).train()
    padded = torch.arange(1.0, 13.0).view(4, 3)
    rows = torch.tensor([0, 2])
    torch.manual_seed(3)
    want = drop(padded)[rows]
    torch.manual_seed(3)
    got = _dropout(padded[rows], drop, rows, 4)
    assert torch.equal(got, want)
    assert set(got.flatten().tolist()) <= {0.0, 2.0, 4.0, 6.0, 14.0, 16.0, 18.0}  # 2 x {1,2,3,7,8,9} or 0
    assert torch.equal(_dropout(padded[rows], drop.eval(), rows, 4), padded[rows])  # eval: identity


def test_forward_is_bit_identical_with_dropout_and_grads_agree(wb):
    model = wb.model
    assert model.base_model.model.config.hidden_dropout_prob > 0  # dropout really on
    plain_logits, plain_grads, plain_after = _step(model, False)
    logits, grads, after = _step(model, True, first_token=False)
    assert torch.equal(logits, plain_logits)  # same math, same dropout masks: equal bits
    assert torch.equal(after, plain_after)  # the same random numbers were drawn
    for name, g in plain_grads.items():  # weight gradients: sums over 15 rows vs 21 with zeros
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7)
    # Outside the block the model is the plain model again.
    assert "forward" not in vars(model.base_model.model.bert)


def test_last_layer_for_the_first_token_only(wb):
    # BertForSequenceClassification reads the pooler's first token only, so by default the
    # last layer computes keys and values of every real token and the rest for position 0.
    model = wb.model
    assert unpadded(model).first_token
    plain_logits, plain_grads, plain_after = _step(model, False)
    logits, grads, after = _step(model, True)
    # Same dropout masks (the same random numbers drawn); the last layer's attention is
    # written out by hand, so the logits agree to float rounding, not bit for bit.
    assert torch.equal(after, plain_after)
    torch.testing.assert_close(logits, plain_logits, rtol=1e-5, atol=1e-6)
    for name, g in plain_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7)


def test_hidden_states_requests_take_the_plain_path(wb):
    ids, mask, _ = _batch()
    with torch.no_grad():
        plain = wb.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        with unpadded(wb.model):
            got = wb.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(got) == len(plain) == 3 and all(torch.equal(a, b) for a, b in zip(got, plain))


def test_a_batch_without_padding_takes_the_plain_path_unless_the_last_layer_is_cut(wb, encode_calls):
    calls = encode_calls
    ids = torch.randint(1000, 2000, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        plain = wb.model(input_ids=ids, attention_mask=mask).logits
        with unpadded(wb.model, first_token=False):  # nothing to save: the model's own path
            assert torch.equal(wb.model(input_ids=ids, attention_mask=mask).logits, plain)
        assert calls == []
        with unpadded(wb.model):  # the last layer on the first token only still saves work
            torch.testing.assert_close(wb.model(input_ids=ids, attention_mask=mask).logits, plain, rtol=1e-5, atol=1e-6)
        assert calls == [1]


def test_eval_unpad_gives_the_padded_metrics(tmp_path, encode_calls):
    # eval.unpad: the workbench's evaluation on real tokens (and the last layer on the
    # first token); the toy test set's batches are padded, so the unpadded path runs.
    # Accuracy is a count of argmaxes: equal; the loss agrees to float rounding.
    plain = Workbench(from_dict(tiny_config(tmp_path, **{"eval.batch_size": 8})))
    state = plain.initial_state()
    want = plain.evaluate(state)
    fast = Workbench(from_dict(tiny_config(tmp_path, **{"eval.batch_size": 8, "eval.unpad": True})))
    got = fast.evaluate(state)
    assert len(encode_calls) == len(fast.eval_batches()) == 5  # 40 test reviews in batches of 8
    assert got["accuracy"] == want["accuracy"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert "forward" not in vars(fast.model.base_model.model.bert)  # the plain model again after it


def test_a_federated_run_matches_to_rounding(tmp_path, encode_calls):
    base = tiny_config(tmp_path, **{"rounds": 1, "train.epochs": 1})
    plain = run_local(from_dict(copy.deepcopy(base)), tmp_path / "plain")
    assert encode_calls == []  # padded training and evaluation
    base["train"]["unpad"] = True
    fast = run_local(from_dict(base), tmp_path / "unpad")
    assert encode_calls  # the toy reviews have several lengths: the unpadded path ran
    assert fast["final"]["accuracy"] == plain["final"]["accuracy"]
    assert fast["final"]["loss"] == pytest.approx(plain["final"]["loss"], rel=1e-5)
    rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("plain", "unpad")]
    assert [r.get("bytes_up") for r in rows[0]] == [r.get("bytes_up") for r in rows[1]]
    a, b = (load_file(str(tmp_path / d / "final.safetensors")) for d in ("plain", "unpad"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)


def test_refusals(tmp_path):
    assert "BertModel" in unpad_problem(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="train.unpad and train.compile"):
        from_dict(tiny_config(tmp_path, **{"train.unpad": True, "train.compile": True}))
    with pytest.raises(ConfigError, match="train.unpad"):
        from_dict(tiny_config(tmp_path, **{"train.unpad": True, "runtime.transport": "batched"}))
    with pytest.raises(ConfigError, match="train.unpad"):
        from_dict(tiny_config(tmp_path, **{"train.unpad": True, "learner.name": "mezo"}))
    with pytest.raises(ConfigError, match="eval.unpad"):  # the joint evaluation of the clients' models
        from_dict(tiny_config(tmp_path, **{"eval.unpad": True, "runtime.transport": "batched", "eval.clients": "sampled",
                                           "federation.client_holdout": 0.2}))
    from_dict(tiny_config(tmp_path, **{"eval.unpad": True, "runtime.transport": "batched"}))  # the server's evaluation only
    llm = tiny_llm_config(tmp_path)
    with pytest.raises(ValueError, match="eval.unpad: true supports BERT-family encoders"):
        Workbench(from_dict({**llm, "eval": {**llm.get("eval", {}), "unpad": True}}))
