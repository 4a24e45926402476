"""Every trainable tensor of every PEFT method changes the model's output.

A tensor that travels and is trained but cannot move the logits is bytes for nothing (or a
tuner wired to the wrong place). For each registered ``peft.method`` (and its main
variants) on the tiny random BERT of conftest, in float64 so that rounding cannot pass for
an effect:

1. perturbing every trainable tensor of the State changes the logits on a fixed batch;
2. from that perturbed State (so that LoRA's B, an adapter's up-projection, ... are no
   longer zero and the tensors feeding them matter too), perturbing one trainable tensor
   at a time changes the logits, for every tensor.

The one exemption is exact: an attention *key* bias ``b_k`` adds ``q . b_k`` to every
score of a query, the same for every key, and softmax is invariant to that shift; so BERT's
``attention.self.key.bias`` never changes the output (its gradient is zero). Methods that
train every bias (``full``, ``bitfit``) carry it; the test asserts that it is the only
tensor without an effect. Effects seen: >= 1e-7 for live tensors (attention-score
parameters of a random-init model are weak), <= 1e-15 for key biases.

Bottleneck adapters are tested at width 8 (``reduction_factor: 4`` of hidden 32), not at the
default width 2. In the random-init tiny BERT the output ``h`` of a layer-0 output projection
is about 0.005 in magnitude, so an adapter unit's pre-activation ``down(h)`` is its bias
(perturbed to ~N(0, 0.1)) to within a few percent, with the same sign on every token: a unit
whose bias is negative is a dead ReLU on the whole batch, and when *all* units of a
placement are dead its ``down.weight`` and ``up.weight`` (and ``down.bias``, unless the new
draw turns positive) have exactly zero effect. At width 2 that happened in two of the four
layer-0 placements of ``dual_adapter`` (shared adapter after attention, personal adapter
after the FFN: both biases -0.03 .. -0.05); it is a property of a width-2 ReLU bottleneck on
near-zero inputs, not a wiring fault (the same tensors are live at width 8, and in MiniLM
the default width is 384 // 16 = 24).
"""

from __future__ import annotations

import pytest
import torch

from fedfm.config import from_dict
from fedfm.peft import get_state, set_state, tuners
from fedfm.runtime.workbench import Workbench

from conftest import tiny_config

# method -> its variants on the tiny model (the method's name is the first key)
VARIANTS = {
    "full": {"method": "full"},
    "lora": {"method": "lora", "r": 4, "target_modules": ["query", "key", "value", "dense"]},
    "ffa_lora": {"method": "ffa_lora", "r": 4},
    "bitfit": {"method": "bitfit"},
    "bitfit_no_ln": {"method": "bitfit", "include_layernorm": False},
    "salience_rows": {"method": "salience", "fraction": 0.25},
    "salience_elements": {"method": "salience", "fraction": 0.1, "granularity": "element"},
    "adapter_houlsby": {"method": "adapter", "reduction_factor": 4},
    "adapter_pfeiffer": {"method": "adapter", "variant": "pfeiffer", "reduction_factor": 4},
    "prompt_tuning": {"method": "prompt_tuning", "num_virtual_tokens": 4},
    "prefix_tuning": {"method": "prefix_tuning", "num_virtual_tokens": 4},
    "p_tuning": {"method": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16},
    "ia3": {"method": "ia3"},
    "sparse": {"method": "sparse", "density": 0.1},
    "feature_attention": {"method": "feature_attention"},
    # the evaluated prompt is the argmax token per position: a perturbation of the
    # distributions moves the output by changing which tokens are chosen
    "discrete_prompt": {"method": "discrete_prompt", "length": 2, "candidates": 5},
    "ffdapt": {"method": "ffdapt", "freeze_start": 0, "freeze_count": 1},
    "personal_prompt": {"method": "personal_prompt", "num_virtual_tokens": 2, "shared": {"method": "lora", "r": 4}},
    # width 8 like the adapter variants: at the default width 2 (32 // 16) every ReLU unit of a
    # placement can be dead on the whole batch (see the module docstring)
    "dual_adapter": {"method": "dual_adapter", "reduction_factor": 4},
    # a soft key mix: at the paper's temperature 0.01 the weights are one-hot to float64
    # precision, and a small perturbation of the adaptive network moves nothing unless it
    # changes the chosen key (that selection is tested in test_personalize_fedapt.py)
    "fedapt": {"method": "fedapt", "num_virtual_tokens": 2, "num_domains": 3, "temperature": 10.0},
    # the ensemble of the global prompt's and the domain prompts' predictions; a soft
    # confidence weighting (T = 10) so that every domain prompt moves the output
    "diprompt": {"method": "diprompt", "num_virtual_tokens": 2, "num_domains": 2, "global_weight": 0.5, "temperature": 10.0},
}
NOISE = 0.1  # std of each perturbation
LIVE = 1e-10  # max |change of a logit| above which a tensor has an effect (float64)
KEY_BIAS = "attention.self.key.bias"


def test_every_registered_method_is_covered():
    assert set(tuners.names()) <= {v["method"] for v in VARIANTS.values()}


def logits_fn(wb: Workbench, n: int = 8):
    batch = wb.eval_batches()[0]
    inputs = {"input_ids": batch["input_ids"][:n], "attention_mask": batch["attention_mask"][:n]}

    def logits(state) -> torch.Tensor:
        set_state(wb.model, state)
        with torch.no_grad():
            return wb.model(**inputs).logits

    return logits


def perturbed(state, gen: torch.Generator, names=None):
    names = set(state) if names is None else set(names)
    return {
        k: (v + NOISE * torch.randn(v.shape, generator=gen, dtype=torch.float64) if k in names else v)
        for k, v in state.items()
    }


@pytest.mark.parametrize("key", sorted(VARIANTS))
def test_each_trainable_tensor_changes_the_logits(tmp_path, key):
    raw = tiny_config(tmp_path)
    raw["peft"] = VARIANTS[key]
    if key in ("diprompt", "discrete_prompt"):  # the tuner is refused without its learner
        raw["learner"] = {"name": "diprompt" if key == "diprompt" else "bdpl"}
    wb = Workbench(from_dict(raw))
    wb.model.double()
    logits = logits_fn(wb)
    start = {k: v.double() for k, v in get_state(wb.model).items()}
    gen = torch.Generator().manual_seed(0)

    before = logits(start)
    base = perturbed(start, gen)
    moved = logits(base)
    # swapping a prompt's real tokens moves the random tiny model's logits by ~1e-5 only
    floor = LIVE if key == "discrete_prompt" else 1e-4
    assert float((moved - before).abs().max()) > floor, f"{key}: perturbing the whole State left the logits unchanged"

    effect = {}
    for name in start:
        effect[name] = float((logits(perturbed(base, gen, [name])) - moved).abs().max())
    dead = sorted(n for n, e in effect.items() if e <= LIVE)
    exempt = sorted(n for n in start if n.endswith(KEY_BIAS))
    assert dead == exempt, f"{key}: trainable tensors without effect on the output: " + ", ".join(
        f"{n} ({effect[n]:.1e})" for n in dead if n not in exempt
    )
    # The exemption is exact, not a weak effect: key biases move nothing beyond rounding.
    assert all(effect[n] < 1e-12 for n in exempt)
