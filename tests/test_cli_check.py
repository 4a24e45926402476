"""``fedfm check``: a config checked as ``fedfm run`` checks it before training (config,
data against the model, components, the tuned model's names and shapes on the meta
device, an init_from run's State), with no pre-trained weights read and nothing written."""

from __future__ import annotations

import torch
import yaml

from conftest import invoke, tiny_config


def write(tmp_path, raw, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def refused_then_passes(monkeypatch, cfg: str, message: str, fix: str) -> None:
    """``fedfm check cfg`` exits 1 naming ``message``; with the override ``fix`` it passes."""
    result, out = invoke(monkeypatch, "check", cfg)
    assert result.exit_code == 1 and message in out, out
    result, out = invoke(monkeypatch, "check", cfg, "-o", fix)
    assert result.exit_code == 0, out


def test_check_passes_a_good_config_and_writes_nothing(tmp_path, monkeypatch):
    cfg = write(tmp_path, tiny_config(tmp_path))
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result, out = invoke(monkeypatch, "check", cfg)
    assert result.exit_code == 0, out
    assert "ok: tiny, 2 rounds, 2 clients, learner local, aggregator fedavg" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no runs/ folder, no labels.json


def test_check_names_what_run_would_refuse(tmp_path, monkeypatch):
    cfg = write(tmp_path, tiny_config(tmp_path, **{"data.max_length": 4096}))
    result, out = invoke(monkeypatch, "check", cfg)
    assert result.exit_code == 1 and "data.max_length=4096 exceeds the model's max_position_embeddings=" in out
    result, out = invoke(monkeypatch, "check", cfg, "-o", "data.label_column=nope")
    assert result.exit_code == 1 and "data.label_column: column 'nope' not in" in out
    result, out = invoke(monkeypatch, "check", cfg, "-o", "train.lrr=1")
    assert result.exit_code == 2 and "did you mean 'lr'?" in out


def test_check_goes_through_every_stage_and_names_the_failing_one(tmp_path, monkeypatch):
    good = tiny_config(tmp_path, peft={"method": "full"})  # a later stage starts from its full State
    bad = tiny_config(tmp_path, **{"data.max_length": 4096})
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"name": "first", "config": good}, {"name": "second", "config": bad}]}))
    monkeypatch.chdir(tmp_path)
    result, out = invoke(monkeypatch, "check", str(path))
    assert result.exit_code == 1
    assert "stage 'first': ok: " in out and "stage 'second': data.max_length=4096 exceeds" in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "chain").exists()


def test_check_builds_the_tuned_model_on_the_meta_device(tmp_path, monkeypatch):
    """Tiny BERT (2 layers), LoRA on query and value: 2 x 2 x (A, B) = 8 LoRA tensors plus the
    classifier's weight and bias that peft keeps trainable = 10; no weights are read."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("fedfm check read weights")

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", refuse)
    cfg = write(tmp_path, tiny_config(tmp_path))
    result, out = invoke(monkeypatch, "check", cfg)
    assert result.exit_code == 0, out
    assert "10 trainable tensors (lora)" in out
    result, out = invoke(monkeypatch, "check", cfg, "-o", "model.init=pretrained")
    assert result.exit_code == 0, out  # a pretrained model's check builds it from its config alone


def test_check_meets_the_name_errors_run_meets_after_loading(tmp_path, monkeypatch):
    cfg = write(tmp_path, tiny_config(tmp_path))
    cases = [
        (["peft.target_modules=[querry]"], "peft.target_modules: ['querry'] match no module of the model"),
        (["peft.local=['*']"], "peft.local ['*'] matches every trainable parameter: nothing is shared"),
    ]
    full = write(tmp_path, tiny_config(tmp_path, peft={"method": "full"}), "full.yaml")
    flash = write(tmp_path, tiny_config(tmp_path, peft={"method": "full", "exclude": ["*embeddings*"]},
                                        learner={"name": "flash", "density": 0.5, "prune": ["*.dense.wieght"]}), "flash.yaml")
    for args, message in cases:
        result, out = invoke(monkeypatch, "check", cfg, "-o", *args)
        assert result.exit_code == 1 and message in out, out
    result, out = invoke(monkeypatch, "check", full, "-o", "peft.exclude=['*']")
    assert result.exit_code == 1 and "peft.exclude: ['*'] matches every parameter of the model: nothing would train" in out
    result, out = invoke(monkeypatch, "check", full, "-o", "peft.exclude=[nope]")
    assert result.exit_code == 1 and "peft.exclude: ['nope'] match no parameter of the model" in out
    result, out = invoke(monkeypatch, "check", flash)
    assert result.exit_code == 1 and "learner.prune ['*.dense.wieght'] matches no 2-D weight" in out, out
    result, out = invoke(monkeypatch, "check", flash, "-o", "learner.prune=['*.dense.weight']")
    assert result.exit_code == 0, out


def test_check_reads_an_init_from_run_against_the_model(tmp_path, monkeypatch):
    """A missing run, adapter tensors, a shape the model lacks: refused by check as by run."""
    from safetensors.torch import save_file

    cfg = write(tmp_path, tiny_config(tmp_path))
    result, out = invoke(monkeypatch, "check", cfg, "-o", f"model.init_from={tmp_path / 'nope'}")
    assert result.exit_code == 1 and f"model.init_from: no final State at {tmp_path / 'nope'}" in out, out
    lora = tmp_path / "lora_run"
    lora.mkdir()
    save_file({"base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight": torch.zeros(4, 32)},
              str(lora / "final.safetensors"))
    result, out = invoke(monkeypatch, "check", cfg, "-o", f"model.init_from={lora}")
    assert result.exit_code == 1 and "holds adapter tensors" in out, out
    wide = tmp_path / "wide.safetensors"
    save_file({"bert.embeddings.word_embeddings.weight": torch.zeros(10, 48)}, str(wide))
    result, out = invoke(monkeypatch, "check", cfg, "-o", f"model.init_from={wide}")
    assert result.exit_code == 1 and "'bert.embeddings.word_embeddings.weight' has shape (10, 48)" in out, out
    fits = tmp_path / "fits.safetensors"
    save_file({"bert.pooler.dense.bias": torch.zeros(32)}, str(fits))
    result, out = invoke(monkeypatch, "check", cfg, "-o", f"model.init_from={fits}")
    assert result.exit_code == 0, out


def test_a_peft_local_pattern_that_matches_nothing_is_refused(tmp_path, monkeypatch):
    """What the user meant to keep on the client would travel and be averaged."""
    cfg = write(tmp_path, tiny_config(tmp_path))
    result, out = invoke(monkeypatch, "check", cfg, "-o", "peft.local=['*classifier.*', 'personal.*']")
    assert result.exit_code == 1 and "peft.local: ['personal.*'] match no trainable parameter" in out, out
    result, out = invoke(monkeypatch, "check", cfg, "-o", "peft.local=['*classifier.*']")
    assert result.exit_code == 0, out


def test_check_warns_of_clients_too_small_to_hold_anything_out(tmp_path, monkeypatch):
    cfg = write(tmp_path, tiny_config(tmp_path, **{"federation.client_holdout": 0.2, "federation.examples_per_client": 1}))
    result, out = invoke(monkeypatch, "check", cfg)
    assert result.exit_code == 0, out
    assert "warning: federation.client_holdout: client(s) [0, 1] hold fewer than 2 examples" in out
    result, out = invoke(monkeypatch, "check", cfg, "-o", "federation.examples_per_client=2")
    assert result.exit_code == 0 and "client_holdout" not in out, out


def test_check_refuses_an_attack_target_outside_the_classes_inferred_from_the_data(tmp_path, monkeypatch):
    """model.num_labels unset: 2 classes come from the data, so target 5 is refused before training."""
    raw = tiny_config(tmp_path, **{"model.num_labels": None})
    raw["attack"] = {"name": "backdoor", "trigger": "cf", "target": 5, "fraction": 0.5}
    refused_then_passes(monkeypatch, write(tmp_path, raw),
                        "(backdoor): target 5 is not a class of the model (model.num_labels 2: classes 0..1)", "attack.target=1")


def test_check_refuses_a_tracking_place_under_a_file(tmp_path, monkeypatch):
    from fedfm.tracking.sinks import place_problem

    blocker = tmp_path / "data.csv"
    blocker.write_text("x")
    assert place_problem(blocker / "tb") == f"{blocker} is a file, not a folder"
    assert place_problem(tmp_path / "new" / "tb") is None  # created by the run
    cfg = write(tmp_path, tiny_config(tmp_path))
    result, out = invoke(monkeypatch, "check", cfg, "-o", f"tracking.tensorboard={{dir: {blocker / 'tb'}}}")
    assert result.exit_code == 1 and f"tracking.tensorboard.dir: cannot write TensorBoard events to {blocker / 'tb'}" in out, out
    result, out = invoke(monkeypatch, "check", cfg, "-o", f"tracking.mlflow={{uri: 'sqlite:///{blocker}/m.db'}}")
    assert result.exit_code == 1 and "tracking.mlflow.uri: cannot open the MLflow store" in out, out
    assert not (tmp_path / "new").exists()


def test_check_resolves_the_split_learners_cut_against_the_model(tmp_path, monkeypatch):
    """Tiny BERT has 2 layers: cut 3 fails on the client at run time; check names it first."""
    raw = tiny_config(tmp_path, **{"learner": {"name": "split"},
                                   "federation.roles": [{"name": "phone", "count": 1, "profile": {"cut": 3}}]})
    refused_then_passes(monkeypatch, write(tmp_path, raw), "(role 'phone'): profile.cut = 3 exceeds the model's 2",
                        "federation.roles.0.profile.cut=1")


def test_check_refuses_what_the_batched_adapters_cannot_serve_and_a_missing_gpu(tmp_path, monkeypatch):
    # LoRA on the word embeddings trains lora_embedding_A/B, which batched adapters do not serve
    raw = tiny_config(tmp_path, **{"runtime.transport": "batched",
                                   "peft.target_modules": ["query", "value", "word_embeddings"]})
    result, out = invoke(monkeypatch, "check", write(tmp_path, raw))
    assert result.exit_code == 1 and "runtime.transport: batched: batched adapters: trainable parameter" in out, out
    if not torch.cuda.is_available():  # as run refuses it before the model loads
        result, out = invoke(monkeypatch, "check", write(tmp_path, tiny_config(tmp_path, **{"runtime.device": "cuda"})))
        assert result.exit_code == 1 and "runtime.device is 'cuda' but torch finds no CUDA device here" in out, out


def test_check_refuses_a_flower_simulation_this_machine_cannot_place(tmp_path, monkeypatch):
    # Ray would stop with "ActorPool is empty" from inside Flower; run and check refuse it by name
    cores = __import__("os").cpu_count() or 1
    raw = tiny_config(tmp_path, **{"runtime": {"backend": "flower", "progress": False,
                                               "flower": {"mode": "simulation", "num_cpus": cores + 1}}})
    result, out = invoke(monkeypatch, "check", write(tmp_path, raw))
    assert result.exit_code == 1 and f"runtime.flower.num_cpus {cores + 1}: this machine has {cores} CPU core(s)" in out, out
