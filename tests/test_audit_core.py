"""New-user audit of the federated core (FedAvg, FedProx, FedDyn, SCAFFOLD, the server
optimizers) and the PEFT tuners: odd and out-of-range input fails before training with
the config field named, and the papers' update rules hold on hand-checked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_config
from fedfm.config import ConfigError, from_dict


# -- non-finite hyperparameters -------------------------------------------------------

@pytest.mark.parametrize(
    "section,spec,field",
    [
        ("server_optimizer", {"name": "sgd", "lr": math.inf}, "server_optimizer.lr"),
        ("server_optimizer", {"name": "fedavgm", "lr": math.inf}, "server_optimizer.lr"),
        ("server_optimizer", {"name": "fedadam", "lr": math.inf}, "server_optimizer.lr"),
        ("server_optimizer", {"name": "fedyogi", "tau": math.inf}, "server_optimizer.tau"),
        ("server_optimizer", {"name": "fedadagrad", "lr": math.nan}, "server_optimizer.lr"),
        ("learner", {"name": "fedprox", "mu": math.inf}, "learner.mu"),
        ("learner", {"name": "feddyn", "alpha": math.inf}, "learner.alpha"),
        ("peft", {"method": "lora", "alpha": math.inf}, "peft.alpha"),
        ("peft", {"method": "ffa_lora", "alpha": math.inf}, "peft.alpha"),
        ("peft", {"method": "adapter", "init_std": math.inf}, "peft.init_std"),
    ],
)
def test_infinite_hyperparameters_are_refused_naming_the_field(tmp_path, section, spec, field):
    # inf passed `gt=0`: a server lr of inf made the global model NaN after round 1 and
    # every later update was rejected; mu or alpha inf made every client's update NaN.
    raw = tiny_config(tmp_path)
    raw[section] = spec
    with pytest.raises(ConfigError, match=rf"{field}: Input should be a finite number"):
        from_dict(raw)


# -- tuners on the tiny BERT (hidden 32, 2 layers, FFN 64, 2 labels) -------------------

def tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    from conftest import TINY_BERT

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=100, num_labels=2, **TINY_BERT))


def tuned(spec: dict) -> torch.nn.Module:
    from fedfm.peft.base import tuners

    method = spec["method"]
    params = tuners.parse(method, {k: v for k, v in spec.items() if k != "method"}, "peft")
    return tuners.get(method).obj(tiny_bert(), params, "text_classification")


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "spec,message",
    [
        # min(out, in) of the 32x32 query weight is 32: a higher rank only adds bytes
        ({"method": "lora", "r": 33}, r"peft.r: 33 exceeds the rank min\(out, in\) = 32 of the weight of "
                                      r"'bert.encoder.layer.0.attention.self.query'"),
        ({"method": "ffa_lora", "r": 64}, r"peft.r: 64 exceeds the rank min\(out, in\) = 32"),
        # peft raised "Target module LayerNorm(...) is not supported" from inside its model code
        ({"method": "lora", "target_modules": ["LayerNorm"]},
         r"peft.target_modules: 'LayerNorm' matches 'bert.embeddings.LayerNorm', a LayerNorm; LoRA wraps linear"),
        ({"method": "lora", "target_modules": ["query", "self"]},
         r"'self' matches 'bert.encoder.layer.0.attention.self', a BertSelfAttention"),
        # peft raised NoMatchingPeftModuleError: the head is in modules_to_save
        ({"method": "lora", "target_modules": ["classifier"]},
         r"peft.target_modules: 'classifier' names the task head, which peft.train_head trains whole"),
        ({"method": "lora", "target_modules": ["querry"]}, r"peft.target_modules: \['querry'\] match no module"),
    ],
)
def test_lora_targets_and_rank_are_checked_before_peft_sees_them(spec, message):
    with pytest.raises(ValueError, match=message):
        tuned(spec)


def test_lora_accepts_what_peft_matches_and_full_rank():
    # a dotted suffix is how peft names a module too (it was refused: only leaf names passed)
    m = tuned({"method": "lora", "r": 4, "target_modules": ["attention.self.query"]})
    assert trainable_count(m) == 2 * (4 * 32 + 32 * 4) + (32 * 2 + 2)  # 2 queries' A, B + the head
    # r = min(out, in) = 32 is the highest useful rank and is accepted
    m = tuned({"method": "lora", "r": 32, "target_modules": ["query"]})
    assert trainable_count(m) == 2 * (32 * 32 + 32 * 32) + 66
    # without train_head, the head is a linear layer like any other (2x32, so r <= 2): A (2x32), B (2x2)
    m = tuned({"method": "lora", "r": 2, "target_modules": ["classifier"], "train_head": False})
    assert trainable_count(m) == 2 * 32 + 2 * 2
    with pytest.raises(ValueError, match=r"peft.r: 3 exceeds the rank min\(out, in\) = 2 of the weight of 'classifier'"):
        tuned({"method": "lora", "r": 3, "target_modules": ["classifier"], "train_head": False})


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"method": "ia3", "target_modules": ["LayerNorm"], "feedforward_modules": []},
         r"peft.target_modules: 'LayerNorm' matches 'bert.embeddings.LayerNorm', a LayerNorm; IA3 rescales"),
        ({"method": "ia3", "target_modules": ["key", "classifier"], "feedforward_modules": []},
         r"peft.target_modules: 'classifier' names the task head"),
    ],
)
def test_ia3_targets_are_checked_before_peft_sees_them(spec, message):
    with pytest.raises(ValueError, match=message):
        tuned(spec)


def test_ia3_takes_dotted_suffixes():
    # l_k on the 2 keys (32 each) and l_ff on the 2 FFN inputs of output.dense (64 each)
    m = tuned({"method": "ia3", "target_modules": ["attention.self.key", "output.dense"],
               "feedforward_modules": ["output.dense"], "train_head": False})
    # peft's suffix rule: output.dense also names attention.output.dense, a feed-forward module
    # of 32 inputs: 2 x (32 + 64 + 32)
    assert trainable_count(m) == 2 * (32 + 64 + 32)


def test_adapter_pattern_that_is_no_regex_is_a_config_error(tmp_path):
    raw = tiny_config(tmp_path)
    raw["peft"] = {"method": "adapter", "attn_pattern": "[dense"}  # re.error from deep in re before
    with pytest.raises(ConfigError, match=r"peft.attn_pattern: Value error, not a regular expression"):
        from_dict(raw)


def test_bitfit_without_biases_names_the_reason():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from fedfm.peft.bitfit import BitFitParams, bitfit
    from tiny_llm import TINY_LLAMA

    llama = LlamaForSequenceClassification(LlamaConfig(vocab_size=64, num_labels=2, pad_token_id=0, **TINY_LLAMA))
    with pytest.raises(ValueError, match="LlamaForSequenceClassification has no bias parameters to train"):
        bitfit(llama, BitFitParams(), "text_classification")
    # a model whose only biases are its norms', with include_layernorm off (and no head bias)
    norms = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.LayerNorm(4))
    with pytest.raises(ValueError, match="peft.include_layernorm: false leaves bitfit nothing to train"):
        bitfit(norms, BitFitParams(include_layernorm=False, train_head=False), "text_classification")
