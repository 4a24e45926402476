"""MeZO's perturbation on a model whose parameters are registered on several modules.

transformers' ``BertForMaskedLM`` (with ``tie_word_embeddings``, as ``model.task:
masked_lm`` builds it) registers ``cls.predictions.bias`` on ``cls.predictions`` and, as
``decoder.bias``, on its child ``cls.predictions.decoder``; the decoder's weight is the
word-embedding matrix. Each must be seen as ``x + eps z`` exactly once per evaluation,
not ``x + 2 eps z`` inside the nested module."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from fedfm.aggregators.zo_replay import param_noise
from fedfm.learners.zo_core import perturbed, spsa_estimate, trainable_params

EPS, SEED = 1e-2, 5


@pytest.fixture(scope="module")
def mlm():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     tie_word_embeddings=True)
    model = BertForMaskedLM(cfg).eval()
    pred = model.cls.predictions
    assert pred.bias is pred.decoder.bias and pred.decoder.weight is model.bert.embeddings.word_embeddings.weight
    ids = torch.tensor([[2, 7, 9, 11, 3], [2, 5, 13, 4, 3]])
    labels = torch.tensor([[-100, 7, -100, 11, -100], [-100, -100, 13, -100, -100]])
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def loss_of(model, batch, params=None):
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if params is None:
        logits = model(**kwargs).logits
    else:  # an independent functional forward with the given parameter values (ties kept)
        logits = torch.func.functional_call(model, params, (), kwargs, tie_weights=True, strict=False).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100).item()


def shifted(model, scale):
    """x + scale z for every trainable parameter, with ``perturbed``'s float32 operations."""
    names = sorted(trainable_params(model))
    params = trainable_params(model)
    return {n: param_noise(params[n].shape, SEED, i).mul_(scale).add_(params[n].detach()) for i, n in enumerate(names)}


@pytest.mark.parametrize("tuned", ["full", "bitfit"])
def test_a_parameter_of_two_modules_is_perturbed_once(mlm, tuned):
    model, batch = mlm
    for n, p in model.named_parameters():
        p.requires_grad_(tuned == "full" or n.endswith("bias"))
    try:
        pred = model.cls.predictions
        seen = {}
        handle = pred.decoder.register_forward_hook(
            lambda m, a, o: seen.update(bias=m.bias.detach().clone(), weight=m.weight.detach().clone()))
        emb = model.bert.embeddings.word_embeddings
        handle2 = emb.register_forward_hook(lambda m, a, o: seen.update(emb=m.weight.detach().clone()))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad(), perturbed(model, SEED, EPS):
            loss_of(model, batch)
        handle.remove()
        handle2.remove()
        want = shifted(model, EPS)
        # inside the decoder (a child of the module that also owns the bias) the bias is x + eps z
        assert torch.equal(seen["bias"], want["cls.predictions.bias"])
        if tuned == "full":  # the tied weight: x + eps z in the embedding and in the decoder
            assert torch.equal(seen["weight"], want["bert.embeddings.word_embeddings.weight"])
            assert torch.equal(seen["emb"], want["bert.embeddings.word_embeddings.weight"])
        else:
            assert torch.equal(seen["weight"], before["bert.embeddings.word_embeddings.weight"])
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # restored exactly
        # the estimate is the central difference of two independent functional forwards
        g, plus, minus = spsa_estimate(model, lambda: loss_of(model, batch), SEED, EPS)
        f_plus, f_minus = loss_of(model, batch, shifted(model, EPS)), loss_of(model, batch, shifted(model, -EPS))
        assert plus == f_plus and minus == f_minus
        assert g == (f_plus - f_minus) / (2 * EPS)
        # the bias counted twice (x + 2 eps z inside the decoder) gives another loss
        twice = shifted(model, EPS)
        twice["cls.predictions.bias"] = param_noise(pred.bias.shape, SEED, sorted(trainable_params(model)).index(
            "cls.predictions.bias")).mul_(2 * EPS).add_(pred.bias.detach())
        assert loss_of(model, batch, twice) != f_plus
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
