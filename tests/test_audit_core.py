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



@pytest.mark.parametrize(
    "section,spec,field,message",
    [
        ("server_optimizer", {"name": "sgd", "lr": 0}, "server_optimizer.lr", "greater than 0"),
        ("server_optimizer", {"name": "fedadam", "lr": -0.01}, "server_optimizer.lr", "greater than 0"),
        ("server_optimizer", {"name": "fedadam", "tau": 0}, "server_optimizer.tau", "greater than 0"),
        ("server_optimizer", {"name": "fedyogi", "beta2": 1.0}, "server_optimizer.beta2", "less than 1"),
        ("server_optimizer", {"name": "fedadagrad", "beta1": -0.1}, "server_optimizer.beta1", "greater than or equal to 0"),
        ("server_optimizer", {"name": "fedavgm", "momentum": 1.0}, "server_optimizer.momentum", "less than 1"),
        # FedAdagrad has no beta2 (v sums every delta^2): it was accepted and ignored
        ("server_optimizer", {"name": "fedadagrad", "beta2": 0.9}, "server_optimizer.beta2", "Extra inputs are not permitted"),
        ("server_optimizer", {"name": "fedavgm", "beta1": 0.9}, "server_optimizer.beta1", "Extra inputs are not permitted"),
        ("learner", {"name": "fedprox", "mu": -0.5}, "learner.mu", "greater than or equal to 0"),
        ("learner", {"name": "feddyn", "alpha": 0}, "learner.alpha", "greater than 0"),
        ("learner", {"name": "scaffold", "control_update": "option2"}, "learner.control_update", "'delta' or 'mean_grad'"),
        ("peft", {"method": "lora", "r": 0}, "peft.r", "greater than or equal to 1"),
        ("peft", {"method": "prompt_tuning", "num_virtual_tokens": 0}, "peft.num_virtual_tokens", "greater than or equal to 1"),
        ("peft", {"method": "prefix_tuning", "num_virtual_tokens": 0}, "peft.num_virtual_tokens", "greater than or equal to 1"),
        ("peft", {"method": "salience", "fraction": 0}, "peft.fraction", "greater than 0"),
        ("peft", {"method": "salience", "fraction": 1.5}, "peft.fraction", "less than or equal to 1"),
        ("peft", {"method": "sparse", "density": 0}, "peft.density", "greater than 0"),
        ("peft", {"method": "salience", "target_modules": []}, "peft.target_modules", "at least 1 item"),
    ],
)
def test_out_of_range_values_name_the_field(tmp_path, section, spec, field, message):
    raw = tiny_config(tmp_path)
    raw[section] = spec
    with pytest.raises(ConfigError, match=rf"{field}: .*{message}"):
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


# -- one server round through the composed algorithm, by hand ---------------------------

def algorithm(tmp_path, **over):
    from fedfm.runtime.algorithm import build_algorithm

    return build_algorithm(from_dict(tiny_config(tmp_path, **{"federation.clients": 4, **over})))


def server_round(algo, ss, updates):
    from fedfm.core.protocols import RoundContext

    ctx = RoundContext(round=1, seed=0, generator=torch.Generator().manual_seed(0), num_clients=4)
    return algo.aggregate(ss, updates, ctx)


def test_scaffold_with_fedadam_and_half_the_clients_by_hand(tmp_path):
    from fedfm.core.types import Update

    algo = algorithm(tmp_path, learner={"name": "scaffold"},
                     server_optimizer={"name": "fedadam", "lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3})
    ss = algo.init({"w": torch.tensor([1.0, -2.0])})
    ups = [  # 2 of N = 4 clients return, holding 1 and 3 examples
        Update(0, {"w": torch.tensor([0.4, 0.0]), "scaffold_c/w": torch.tensor([1.0, 2.0])}, 1),
        Update(1, {"w": torch.tensor([0.0, -0.4]), "scaffold_c/w": torch.tensor([3.0, -2.0])}, 3),
    ]
    ss, _ = server_round(algo, ss, ups)
    # c <- c + |S|/N mean(dc) = 0 + 2/4 * [2, 0]  (Karimireddy et al., Algorithm 1, line 17)
    assert torch.allclose(ss["scaffold.c"]["w"], torch.tensor([1.0, 0.0]))
    # delta = 1/4 [0.4, 0] + 3/4 [0, -0.4] = [0.1, -0.3] (example-weighted); FedAdam (Reddi et al.):
    # m = 0.1 delta = [0.01, -0.03];  v = 0.99 tau^2 + 0.01 delta^2 = [1.0099e-4, 9.0099e-4]
    assert torch.allclose(ss["opt.m"]["w"], torch.tensor([0.01, -0.03]))
    assert torch.allclose(ss["opt.v"]["w"], torch.tensor([1.0099e-4, 9.0099e-4]))
    expected = [1.0 + 0.1 * 0.01 / (math.sqrt(1.0099e-4) + 1e-3), -2.0 - 0.1 * 0.03 / (math.sqrt(9.0099e-4) + 1e-3)]
    assert torch.allclose(ss["model"]["w"], torch.tensor(expected))  # [1.0905028, -2.0967226]
    assert torch.allclose(ss["model"]["w"], torch.tensor([1.0905028, -2.0967226]))


def test_feddyn_with_fedavgm_over_two_rounds_by_hand(tmp_path):
    from fedfm.core.types import Update

    algo = algorithm(tmp_path, learner={"name": "feddyn", "alpha": 0.5},
                     server_optimizer={"name": "fedavgm", "lr": 1.0, "momentum": 0.9})
    ss = algo.init({"w": torch.zeros(2)})
    ups = [Update(0, {"w": torch.tensor([1.0, 2.0])}, 5), Update(1, {"w": torch.tensor([3.0, -2.0])}, 5)]
    ss, _ = server_round(algo, ss, ups)
    # h = 0 - alpha/m sum(delta) = -0.5/4 [4, 0] = [-0.5, 0];  pseudo = mean - h/alpha = [2, 0] + [1, 0]
    # FedAvgM: v = [3, 0], w = [3, 0]
    assert torch.allclose(ss["feddyn.h"]["w"], torch.tensor([-0.5, 0.0]))
    assert torch.allclose(ss["model"]["w"], torch.tensor([3.0, 0.0]))
    ss, _ = server_round(algo, ss, ups)
    # h = [-0.5, 0] - 0.125 [4, 0] = [-1, 0];  pseudo = [2, 0] + [2, 0] = [4, 0]
    # v = 0.9 [3, 0] + [4, 0] = [6.7, 0];  w = [3, 0] + [6.7, 0] = [9.7, 0]
    assert torch.allclose(ss["feddyn.h"]["w"], torch.tensor([-1.0, 0.0]))
    assert torch.allclose(ss["opt.v"]["w"], torch.tensor([6.7, 0.0]))
    assert torch.allclose(ss["model"]["w"], torch.tensor([9.7, 0.0]))


def test_adapter_bottleneck_of_zero_width_is_refused():
    # hidden 32 // 64 = 0: the bottleneck was silently widened to 1
    with pytest.raises(ValueError, match=r"peft.reduction_factor: 64 exceeds the width 32 of "
                                         r"'bert.encoder.layer.0.attention.output.dense'"):
        tuned({"method": "adapter", "reduction_factor": 64})
    # 32 // 32 = 1: one bottleneck unit, down 32x1 + 1, up 1x32 + 32 = 97 per adapter, 4 adapters,
    # the head and (Houlsby) the 5 LayerNorms' 64 values each
    assert trainable_count(tuned({"method": "adapter", "reduction_factor": 32})) == 4 * 97 + 66 + 5 * 64


# -- clients on a bfloat16 model ------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_bench(tmp_path_factory):
    from fedfm.runtime.workbench import Workbench

    return Workbench(from_dict(tiny_config(tmp_path_factory.mktemp("bf16"), **{"model.dtype": "bfloat16"})))


@pytest.mark.parametrize("learner", [{"name": "local"}, {"name": "fedprox", "mu": 0.1}, {"name": "feddyn", "alpha": 0.1},
                                     {"name": "scaffold", "control_update": "delta"}])
def test_an_untrained_client_on_a_bf16_model_sends_a_zero_delta(bf16_bench, tmp_path, learner):
    # The server's float32 State is off the bfloat16 grid (as after any FedAdam step); the
    # client starts from its rounding. With lr 1e-30 nothing moves, so the delta must be 0:
    # it was the rounding error (1e-4 here), which FedAdam turned into steps of ~lr.
    from fedfm.config import TrainConfig
    from fedfm.core.types import Instruction
    from fedfm.learners import build_learner
    from fedfm.runtime.store import ClientStore

    g = torch.Generator().manual_seed(0)
    state = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in bf16_bench.initial_state().items()}
    assert any(not torch.equal(v.bfloat16().float(), v) for v in state.values())
    store = ClientStore(tmp_path / "store")
    ctx = bf16_bench.context(0, 1, store=store)
    ctx.train = TrainConfig(optimizer="sgd", lr=1e-30, steps=1, batch_size=8, max_grad_norm=None)
    spec = type("Spec", (), {"name": learner["name"], "params": lambda self: {k: v for k, v in learner.items() if k != "name"}})()
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    update = build_learner(spec).local_update(Instruction(1, 0, state, broadcast={"scaffold_c": zeros}), ctx)
    assert all(torch.count_nonzero(v) == 0 for v in update.payload.values())  # c_i too: -(x - y)/(K lr) = 0
    for key in ("feddyn_grad", "scaffold_c"):  # g_k = -alpha (v - w) = 0, c_i = 0
        kept = store.get(0, key)
        assert kept is None or all(torch.count_nonzero(v) == 0 for v in kept.values())


# -- FedProx by value (Li et al. 2020) --------------------------------------------------

def test_fedprox_second_step_adds_lr_squared_mu_times_the_first_gradient(tmp_path):
    # Two plain-SGD steps on one full batch, dropout off. FedProx's first step equals plain
    # SGD's (v = w); its second adds -lr mu (v1 - w) = lr^2 mu g(w):
    #   delta_prox - delta_plain = -lr mu delta_plain(1 step)
    import dataclasses

    from conftest import TINY_BERT
    from fedfm.core.types import Instruction
    from fedfm.learners import build_learner
    from fedfm.runtime.workbench import Workbench

    raw = tiny_config(tmp_path)
    raw["model"]["config_overrides"] = {**TINY_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    raw["train"] = {"optimizer": "sgd", "lr": 0.1, "max_grad_norm": None, "steps": 2, "batch_size": 1024}
    wb = Workbench(from_dict(raw))
    g = torch.Generator().manual_seed(1)
    state = {k: (0.05 * torch.randn(v.shape, generator=g) if "lora_B" in k else v) for k, v in wb.initial_state().items()}

    def delta(name, steps, **params):
        spec = type("Spec", (), {"name": name, "params": lambda self: params})()
        ctx = wb.context(0, 1)
        ctx = dataclasses.replace(ctx, train=ctx.train.model_copy(update={"steps": steps}))
        return build_learner(spec).local_update(Instruction(1, 0, state), ctx).payload

    one, plain, prox = delta("local", 1), delta("local", 2), delta("fedprox", 2, mu=2.0)
    largest = 0.0
    for k in state:
        expected = -0.1 * 2.0 * one[k]
        got = prox[k] - plain[k]
        largest = max(largest, float(expected.abs().max()))
        assert torch.allclose(got, expected, rtol=1e-3, atol=1e-7), (k, float((got - expected).abs().max()))
    assert largest > 1e-3  # not vacuous: the head's shift is of order lr^2 mu |g|


def test_ffa_lora_refuses_embedding_targets():
    # peft's embedding LoRA (lora_embedding_A zero, lora_embedding_B random) kept both factors
    # trainable under ffa_lora: not FFA-LoRA, silently
    with pytest.raises(ValueError, match=r"peft.target_modules: 'word_embeddings' matches the embedding "
                                         r"'bert.embeddings.word_embeddings': ffa_lora freezes A"):
        tuned({"method": "ffa_lora", "r": 4, "target_modules": ["query", "word_embeddings"]})
    m = tuned({"method": "ffa_lora", "r": 4, "target_modules": ["query"], "a_seed": 0})
    assert trainable_count(m) == 2 * 32 * 4 + 66  # B of the 2 queries and the head


def test_scaffold_client_without_a_step_fails_instead_of_sending_nan(tmp_path):
    # A client middleware may leave a client no example; c_i+ = mean of 0 gradients was 0/0
    from fedfm.core.types import Instruction
    from fedfm.learners import build_learner
    from fedfm.runtime.store import ClientStore
    from fedfm.runtime.workbench import Workbench

    wb = Workbench(from_dict(tiny_config(tmp_path)))
    state = wb.initial_state()
    ctx = wb.context(0, 1, store=ClientStore(tmp_path / "store"))
    ctx.examples = []
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    spec = type("Spec", (), {"name": "scaffold", "params": lambda self: {}})()
    with pytest.raises(ValueError, match="scaffold: client 0 took no local step"):
        build_learner(spec).local_update(Instruction(1, 0, state, broadcast={"scaffold_c": zeros}), ctx)
    assert ctx.store.get(0, "scaffold_c") is None  # nothing stored


@pytest.mark.parametrize(
    "peft,message",
    [  # both were accepted and silently had no effect
        ({"method": "prefix_tuning", "encoder_hidden_size": 64}, "peft: Value error, encoder_hidden_size is the width "
                                                                 "of the projection MLP, which projection: false"),
        ({"method": "adapter", "variant": "pfeiffer", "attn_pattern": r"\.attention\.output\.dense$"},
         "peft: Value error, attn_pattern places the attention adapter, which variant pfeiffer"),
    ],
)
def test_a_parameter_the_chosen_variant_ignores_is_refused(tmp_path, peft, message):
    raw = tiny_config(tmp_path)
    raw["peft"] = peft
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)
    raw["peft"] = {**peft, **({"projection": True} if "encoder_hidden_size" in peft else {"variant": "houlsby"})}
    from_dict(raw)  # with the variant that reads it


@pytest.mark.parametrize(
    "peft,switch",
    [({"method": "adapter"}, "train.unpad"), ({"method": "adapter", "variant": "pfeiffer"}, "train.unpad"),
     ({"method": "adapter"}, "eval.unpad"), ({"method": "prefix_tuning", "num_virtual_tokens": 4}, "eval.unpad")],
)
def test_tuners_the_padding_free_encoder_cannot_run_are_refused(tmp_path, peft, switch):
    # before: 'Identity' object has no attribute 'p' (adapters) / IndexError (prefix) from learners/unpad.py,
    # at round 0's evaluation or in every client (each round skipped)
    raw = tiny_config(tmp_path, **{switch: True})
    raw["peft"] = peft
    with pytest.raises(ConfigError, match=rf"{switch}: peft.method {peft['method']} cannot run padding-free"):
        from_dict(raw)


@pytest.mark.parametrize("peft", [{"method": "lora", "r": 4}, {"method": "ia3"}, {"method": "prompt_tuning", "num_virtual_tokens": 4}])
def test_tuners_the_padding_free_encoder_runs_pass(tmp_path, peft):
    raw = tiny_config(tmp_path, **{"train.unpad": True, "eval.unpad": True})
    raw["peft"] = peft
    from_dict(raw)


def test_server_optimizer_must_add_the_delta_as_is_names_its_real_lr(tmp_path):
    # fedadam's lr defaults to 0.01: the refusal used to say "lr 1.0" (the sgd default it read)
    from fedfm.aggregators.server_opt import not_as_is
    from fedfm.config import ServerOptimizerSpec as Spec

    assert not_as_is(Spec(name="sgd")) is None
    assert not_as_is(Spec(name="sgd", lr=0.5)) == "sgd (lr 0.5)"
    assert not_as_is(Spec(name="fedadam")) == "fedadam (lr 0.01)"
    assert not_as_is(Spec(name="fedavgm", lr=1.0)) == "fedavgm (lr 1.0, momentum 0.9)"  # momentum: not as is
    assert not_as_is(Spec(name="fedavgm", lr=1.0, momentum=0.0)) is None  # v = delta: w + delta


@pytest.mark.parametrize("field", ["train.lr", "train.weight_decay", "train.max_grad_norm", "faults.stragglers.high",
                                   "faults.stragglers.seconds_per_step", "faults.stragglers.deadline_s",
                                   "runtime.flower.round_timeout_s", "runtime.flower.num_cpus"])
def test_an_infinite_client_setting_is_refused(tmp_path, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.") + r".*finite number"):
        from_dict(tiny_config(tmp_path, **{field: float("inf")}))


def test_bdpl_refuses_a_server_optimizer_that_does_not_average(tmp_path):
    raw = tiny_config(tmp_path, **{"peft": {"method": "discrete_prompt"}, "learner": {"name": "bdpl"},
                                   "server_optimizer": {"name": "fedadam"}})
    with pytest.raises(ConfigError, match=r"learner bdpl: the server averages .* \(got fedadam \(lr 0.01\)\)"):
        from_dict(raw)
