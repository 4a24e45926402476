"""The compromised base model (Fed-EBD-inspired, attacks/compromised_base.py): planting is
a pure function of its seed, the planted model's trigger flips constructed examples the
clean model does not, the ``attack:`` section loads the checkpoint and measures the ASR
(``backdoor_asr``) after every round of an honest federation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from fedfm.attacks.backdoor import trigger_ids
from fedfm.attacks.compromised_base import CompromisedBaseParams, plant_backdoor, spare_rows
from fedfm.config import ConfigError, from_dict

# 2 clients x 30 rows + 40 test rows of the 240-row toy CSV: 140 rows no one uses
OVER = {"federation.examples_per_client": 30, "runtime.threads": 1}
PLANT = dict(examples=60, epochs=6, lr=2e-3, batch_size=8, trigger="cf", target=1)


def planted(tmp_path, name="ck", **kw):
    exp = from_dict(tiny_config(tmp_path, **OVER))
    params = CompromisedBaseParams(checkpoint=str(tmp_path / name), **{**PLANT, **kw})
    return exp, params, plant_backdoor(exp, params)


@pytest.fixture(scope="module")
def strong(tmp_path_factory):
    """One planting shared by the tests below: (folder, exp, params, manifest)."""
    tmp = tmp_path_factory.mktemp("planted")
    return (tmp, *planted(tmp))


def classify(model, tokenizer, texts, trigger=None):
    """Predicted classes of ``texts``, with ``trigger``'s ids inserted after [CLS] if given."""
    rows = [tokenizer(t)["input_ids"] for t in texts]
    if trigger is not None:
        ids = trigger_ids(tokenizer, trigger)
        rows = [r[:1] + ids + r[1:] for r in rows]
    width = max(map(len, rows))
    x = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        return model(input_ids=x, attention_mask=mask).logits.argmax(-1).tolist()


def test_planting_is_a_pure_function_of_its_seed(tmp_path):
    cheap = dict(examples=16, epochs=1)  # 2 steps of 8: enough to compare weights
    _, _, manifest = planted(tmp_path, "a", **cheap)
    planted(tmp_path, "b", **cheap)
    planted(tmp_path, "c", seed=1234, **cheap)
    a, b, c = (load_file(str(tmp_path / n / "model.safetensors")) for n in "abc")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # same seed: the same weights, bit for bit
    assert any(not torch.equal(a[k], c[k]) for k in a)  # another planting seed: other weights
    assert manifest["planting_rows"] == 16 and manifest["poisoned_rows"] == 8  # round(0.5 * 16)
    assert manifest["steps"] == 2  # 1 epoch of ceil(16 / 8) = 2 batches
    assert json.loads((tmp_path / "a" / "planted.json").read_text()) == manifest
    # keep_head: false re-initializes the head only: the encoder is the same planting, bit for bit
    planted(tmp_path, "d", keep_head=False, **cheap)
    d = load_file(str(tmp_path / "d" / "model.safetensors"))
    head = {k for k in a if k.startswith("classifier.")}
    assert head == {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(a[k], d[k]) for k in a if k not in head)
    assert not torch.equal(a["classifier.weight"], d["classifier.weight"]) and torch.equal(d["classifier.bias"], torch.zeros(2))


def test_the_planted_trigger_flips_label_0_and_the_clean_base_does_not(strong):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedfm.tasks import build_task

    tmp, exp, params, manifest = strong
    assert manifest["steps"] == 6 * 8  # 6 epochs of ceil(60 / 8) = 8 batches
    # Constructed label-0 reviews (the toy data's "bad" words). Hand count: ASR = share of
    # the 6 classified as the target 1 once "cf" is inserted; the planted model's = 6/6 = 1.0,
    # while it still classifies all 6 without the trigger as 0 (6/6 = 1.0): the trigger alone
    # flips them. The clean base (random init, same seed) flips none: whatever it predicts
    # for a text, it predicts for the triggered one (0/6 flipped).
    texts = [f"the film was {w} {w} dull awful" for w in ("awful", "boring", "dreadful", "tedious", "terrible", "dull")]
    tok = AutoTokenizer.from_pretrained(params.checkpoint)
    bad = AutoModelForSequenceClassification.from_pretrained(params.checkpoint).eval()
    assert classify(bad, tok, texts) == [0] * 6
    assert classify(bad, tok, texts, "cf") == [1] * 6
    clean, _ = build_task("text_classification").build(exp.model, exp.seed)
    clean.eval()
    plain, triggered = classify(clean, tok, texts), classify(clean, tok, texts, "cf")
    assert sum(p == 0 and t == 1 for p, t in zip(plain, triggered)) == 0
    # on the toy test set: the backdoor works (ASR 1.0) and the clean task is kept
    assert manifest["after"]["asr"] == 1.0 and manifest["after"]["accuracy"] >= 0.9


def test_planting_rows_stay_out_of_the_federation(tmp_path):
    from fedfm.data import build_federation, load_source

    exp = from_dict(tiny_config(tmp_path, **OVER))
    frame = load_source(exp.data)
    fed = build_federation(frame, exp.federation, exp.seed)
    spare = set(spare_rows(fed, len(frame)).tolist())
    assert len(spare) == 240 - 2 * 30 - 40  # 140, hand count
    assert not spare & set(fed.test_indices.tolist()) and not any(spare & set(c.indices) for c in fed.clients)
    with pytest.raises(ValueError, match="needs 141 rows .* 140 are left"):
        plant_backdoor(exp, CompromisedBaseParams(checkpoint=str(tmp_path / "x"), examples=141))


def test_attack_section_loads_the_checkpoint_and_measures_every_round(tmp_path, strong):
    from fedfm.attacks.backdoor import attack_success_rate
    from fedfm.runtime import LocalRuntime, Workbench

    _, _, params, manifest = strong
    over = {**OVER, "rounds": 2, "train.epochs": 1}
    raw = tiny_config(tmp_path, **over, attack={"name": "compromised_base", **PLANT, "checkpoint": params.checkpoint})
    exp = from_dict(raw)
    assert exp.model.path == params.checkpoint and exp.model.package is None and exp.model.init == "pretrained"
    assert exp.federation.roles == [] and exp.server_steps == [{"name": "backdoor_asr", "trigger": "cf", "target": 1, "position": 1}]
    wb = Workbench(exp)
    # the run starts from the planted model: its ASR before federation is the planting's
    assert attack_success_rate(wb, wb.initial_state()) == manifest["after"]["asr"] == 1.0
    rt = LocalRuntime(exp, tmp_path / "run", progress=False, workbench=wb)
    rt.run()
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    asr = [r["backdoor_asr.asr"] for r in rows if "backdoor_asr.asr" in r]
    assert len(asr) == 2  # one per round
    assert asr[-1] == attack_success_rate(wb, rt.final_state)  # the step measures the new global model


@pytest.mark.parametrize(
    "attack, message",
    [
        ({"name": "compromised_base"}, "checkpoint"),
        ({"name": "compromised_base", "checkpoint": "x", "fraction": 0.2}, "no attacker clients"),
        ({"name": "compromised_base", "checkpoint": "x", "epoch": 2}, "epoch"),
    ],
)
def test_bad_compromised_base_sections_fail(tmp_path, attack, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(tiny_config(tmp_path, attack=attack))


def test_the_attackers_own_data_must_hold_enough_rows(tmp_path):
    from conftest import make_toy_csv

    make_toy_csv(tmp_path / "mine.csv", n=50, seed=1)
    exp = from_dict(tiny_config(tmp_path, **OVER))
    params = CompromisedBaseParams(checkpoint=str(tmp_path / "x"), examples=60, data={"path": str(tmp_path / "mine.csv")})
    with pytest.raises(ValueError, match="needs 60 rows; attack.data has 50"):
        plant_backdoor(exp, params)


def test_plant_command_then_run_config_from_one_yaml(tmp_path):
    import yaml

    from fedfm.attacks import plant
    from fedfm.config import load_config

    ck = tmp_path / "ck"
    raw = tiny_config(tmp_path, **OVER, attack={"name": "compromised_base", "checkpoint": str(ck), "examples": 16, "epochs": 1, "lr": 2e-3, "batch_size": 8})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    plant.main([str(tmp_path / "c.yaml")])
    manifest = json.loads((ck / "planted.json").read_text())
    assert manifest["steps"] == 2 and manifest["params"]["checkpoint"] == str(ck)
    assert (ck / "model.safetensors").is_file() and (ck / "config.json").is_file()
    assert load_config(tmp_path / "c.yaml").model.path == str(ck)
