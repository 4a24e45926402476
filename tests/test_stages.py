"""A stages file: DAPT chained into fine-tuning from one YAML file (``fedfm.stages``,
``fedfm run STAGES.yaml --out DIR``)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import invoke, tiny_config
from fedfm.config import from_dict, load_config
from fedfm.overrides import ConfigError
from fedfm.stages import load_stages
from fedfm.runtime.workbench import Workbench

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def stage_configs(tmp_path: Path) -> tuple[dict, dict]:
    """Tiny masked-LM DAPT (full, 1 round of 2 steps), then full fine-tuning of the
    classifier (2 rounds of 1 step, every checkpoint kept: round 0 is its initial State)."""
    dapt = tiny_config(tmp_path, rounds=1, **{"model.task": "masked_lm", "train.steps": 2, "model.num_labels": None})
    dapt["peft"] = {"method": "full"}
    tune = tiny_config(tmp_path, rounds=2, **{"train.steps": 1, "server.keep_checkpoints": 5})
    tune["peft"] = {"method": "full"}
    for raw in (dapt, tune):
        raw.pop("name")
    return dapt, tune


def write_stages(tmp_path: Path, dapt: dict, tune: dict, name: str = "chain.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"stages": [{"name": "dapt", "config": dapt}, {"name": "finetune", "config": tune}]}))
    return path


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """(stages file, DIR) of one finished 2-stage chain run by ``fedfm run``; copied per test."""
    root = tmp_path_factory.mktemp("chain")
    path = write_stages(root, *stage_configs(root))
    mp = pytest.MonkeyPatch()
    try:
        result, text = invoke(mp, "run", str(path), "--out", str(root / "out"))
    finally:
        mp.undo()
    assert result.exit_code == 0, text
    assert "stages done: dapt, finetune" in text
    return path, root / "out"


def copy_chain(chain, tmp_path: Path) -> tuple[Path, Path]:
    path, out = chain
    shutil.copytree(out, tmp_path / "out")
    shutil.copy(path, tmp_path / path.name)
    shutil.copy(path.parent / "toy.csv", tmp_path / "toy.csv")
    return tmp_path / path.name, tmp_path / "out"


def test_second_stage_starts_from_the_first_stage_final_body(chain, tmp_path):
    path, out = chain
    dapt_final = load_file(str(out / "dapt" / "final.safetensors"))
    tune_start = load_file(str(out / "finetune" / "checkpoints" / "round-000000" / "state.safetensors"))
    # The masked-LM stage's encoder (bert.*: embeddings and both layers) is the
    # classifier's initial encoder, tensor for tensor; its MLM head (cls.*) has no place.
    body = sorted(k for k in dapt_final if k.startswith("bert."))
    assert len(body) > 20 and any(".layer.1." in k for k in body) and any(k.startswith("cls.") for k in dapt_final)
    for k in body:
        assert torch.equal(tune_start[k], dapt_final[k]), k
    # ... which the DAPT stage moved away from the plain (same-seed) start of the classifier.
    plain = Workbench(from_dict(tiny_config(tmp_path, **{"peft": {"method": "full"}}))).initial_state()
    assert any(not torch.equal(plain[k], dapt_final[k]) for k in body)
    # The classifier head and the pooler are not in the DAPT State: the plain start's.
    for k in tune_start:
        if not k.startswith("bert.") or k.startswith("bert.pooler."):
            assert k not in dapt_final and torch.equal(tune_start[k], plain[k]), k
    # The chain wrote the init into stage 2's config.yaml.
    saved = yaml.safe_load((out / "finetune" / "config.yaml").read_text())
    assert saved["model"]["init_from"] == str(out / "dapt")


def test_bad_field_in_stage_two_refused_before_anything_runs(tmp_path, monkeypatch):
    dapt, tune = stage_configs(tmp_path)
    tune["train"]["lrr"] = 0.1
    path = write_stages(tmp_path, dapt, tune)
    result, text = invoke(monkeypatch, "run", str(path), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, text
    assert "stage 'finetune' (stages.1 of" in text and "train.lrr: Extra inputs are not permitted" in text
    assert not (tmp_path / "out").exists()
    # The data-against-model check of fedfm run, on stage 2 too: texts longer than the
    # tiny model's 128 positions.
    dapt, tune = stage_configs(tmp_path)
    tune["data"]["max_length"] = 512
    path = write_stages(tmp_path, dapt, tune)
    result, text = invoke(monkeypatch, "run", str(path), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1, text
    assert "stage 'finetune'" in text and "max_length" in text
    assert not (tmp_path / "out" / "dapt").exists() and not (tmp_path / "out").exists()
    # The tuner against the model's names (runtime/skeleton.py), on stage 2 too.
    dapt, tune = stage_configs(tmp_path)
    tune["peft"] = {"method": "full", "exclude": ["*embedings*"]}
    path = write_stages(tmp_path, dapt, tune)
    result, text = invoke(monkeypatch, "run", str(path), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1, text
    assert "stage 'finetune': peft.exclude: ['*embedings*'] match no parameter of the model" in text
    assert not (tmp_path / "out").exists()


def test_existing_outputs_are_not_overwritten_without_the_flag(chain, tmp_path, monkeypatch):
    path, out = copy_chain(chain, tmp_path)
    before = hashes(out)
    result, text = invoke(monkeypatch, "run", str(path), "--out", str(out))
    assert result.exit_code == 2, text
    assert "stage 'dapt':" in text and "already holds files" in text and "--overwrite" in text and "--resume" in text
    assert hashes(out) == before
    result, text = invoke(monkeypatch, "run", str(path), "--out", str(out), "--overwrite")
    assert result.exit_code == 0, text
    assert "stages done: dapt, finetune" in text and not list(out.glob("*/.replaced-*"))


def test_resume_skips_finished_stage_and_continues_the_interrupted_one(tmp_path, monkeypatch):
    # Run in place: stage 2's model.init_from is the path of stage 1's folder, so a moved
    # chain resumes only with its config changed (refused by the round loop).
    path, out = write_stages(tmp_path, *stage_configs(tmp_path)), tmp_path / "out"
    result, text = invoke(monkeypatch, "run", str(path), "--out", str(out))
    assert result.exit_code == 0, text
    dapt_before = hashes(out / "dapt")
    # Stage 2 as if interrupted after round 1: no round-2 checkpoint, no final model.
    for name in ("final.safetensors", "summary.json"):
        (out / "finetune" / name).unlink()
    shutil.rmtree(out / "finetune" / "checkpoints" / "round-000002")
    result, text = invoke(monkeypatch, "run", str(path), "--out", str(out), "--resume")
    assert result.exit_code == 0, text
    assert "stage dapt (1 of 2): finished in" in text and "skipped" in text
    assert "stage finetune (2 of 2) ->" in text and "resuming after round 1" in text
    assert hashes(out / "dapt") == dapt_before
    assert (out / "finetune" / "final.safetensors").is_file()
    # A finished stage whose config has changed since is not silently skipped.
    raw = yaml.safe_load(path.read_text())
    raw["stages"][0]["config"]["train"]["lr"] = 0.5
    path.write_text(yaml.safe_dump(raw))
    result, text = invoke(monkeypatch, "run", str(path), "--out", str(out), "--resume")
    assert result.exit_code == 2, text
    assert "stage 'dapt' finished in" in text and "with another config (train.lr: was 0.01, now 0.5)" in text
    assert hashes(out / "dapt") == dapt_before


def test_stage_refusals(tmp_path):
    dapt, tune = stage_configs(tmp_path)

    def refused(stages, match, overrides=None, **top):
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump({**top, "stages": stages}))
        with pytest.raises(ConfigError, match="(?s)" + match):
            load_stages(path, tmp_path / "out", overrides)

    refused([{"name": "a", "config": dapt}, {"name": "a", "config": tune}], r"stages.1.name 'a' is also the name of stages.0")
    refused([{"name": "a/b", "config": dapt}], r"stages.0.name: String should match pattern")
    refused([{"name": "a", "config": dapt, "extra": 1}], r"stages.0.extra: Extra inputs are not permitted")
    refused([], r"stages: List should have at least 1 item")
    refused([{"name": "a", "config": dapt}], r"(?s)model: Extra inputs.*only name and stages", model={"package": "x"})
    tune_init = {**tune, "model": {**tune["model"], "init_from": "elsewhere"}}
    refused([{"name": "a", "config": dapt}, {"name": "b", "config": tune_init}], r"stage 'b'.*model.init_from is set \(elsewhere\).*remove it")
    refused([{"name": "a", "config": dapt}, {"name": "b", "config": tune, "overrides": ["model.init_from=x"]}],
            r"stage 'b'.*model.init_from is set \(x\)")
    lora = {**dapt, "peft": {"method": "lora", "r": 2, "target_modules": ["query"]}}
    refused([{"name": "a", "config": lora}, {"name": "b", "config": tune}], r"stage 'b'.*stage 'a' trains with peft.method lora")
    deeper = {**tune, "model": {**tune["model"], "config_overrides": {**tune["model"]["config_overrides"], "num_hidden_layers": 3}}}
    refused([{"name": "a", "config": dapt}, {"name": "b", "config": deeper}], r"stage 'b'.*base model .* differs from that of stage 'a'")
    refused([{"name": "a", "config": dapt}, {"name": "b", "config": tune}], r"override 'c:train.lr=1': no stage 'c'", ["c:train.lr=1"])
    refused([{"name": "a", "config": dapt}, {"name": "b", "config": tune}], r"stage 'b'.*train.lr", ["b:train.lr=-1"])
    refused([{"name": "a", "config": "missing.yaml"}], r"stage 'a'.*config file not found")


def test_overrides_files_and_the_first_stage_init(tmp_path):
    dapt, tune = stage_configs(tmp_path)
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(tune))
    start = tmp_path / "some" / "run"  # the first stage's init_from must hold a final State
    start.mkdir(parents=True)
    (start / "final.safetensors").write_bytes(b"")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"stages": [
        {"name": "a", "config": {**dapt, "model": {**dapt["model"], "init_from": str(start)}}},
        {"name": "b", "config": "tune.yaml", "overrides": ["train.lr=0.5"]},
    ]}))
    _, stages = load_stages(path, tmp_path / "out", ["seed=3", "b:train.batch_size=4"])
    a, b = (s.exp for s in stages)
    assert a.model.init_from == str(start) and b.model.init_from == str(tmp_path / "out" / "a")
    assert (a.seed, b.seed) == (3, 3) and b.train.lr == 0.5 and (a.train.batch_size, b.train.batch_size) == (8, 4)
    assert (a.name, b.name) == ("a", "b") and stages[1].source == str(tmp_path / "tune.yaml")


def test_example_reuses_the_two_dapt_chain_configs(tmp_path):
    _, stages = load_stages(ROOT / "examples/adaptability/dapt_then_finetune.yaml", tmp_path / "out")
    assert [s.name for s in stages] == ["dapt", "finetune"]
    for stage, old in zip(stages, ("dapt_chain_dapt", "dapt_chain_finetune")):
        mine, theirs = stage.exp.dump(), load_config(ROOT / f"examples/adaptability/{old}.yaml").dump()
        for d in (mine, theirs):
            d.pop("name"), d["model"].pop("init_from")
        assert mine == theirs, old


def test_data_describe_takes_a_stage(chain, tmp_path, monkeypatch):
    path, _ = copy_chain(chain, tmp_path)
    result, text = invoke(monkeypatch, "data", "describe", str(path), "--stage", "finetune")
    assert result.exit_code == 0, text
    assert "labels" in text
    result, text = invoke(monkeypatch, "data", "describe", str(path))
    assert result.exit_code == 2 and "is a stages file (dapt, finetune)" in text and "--stage NAME" in text
