"""``model.init_from`` paths of a chain: recorded absolute, and an old relative one found
from any working directory (``personalize/init_from.py``: ``absolute``, ``earlier_run``;
``stages.py``: ``chained_init``).

The chain: stage 0 ``full`` trains the query weight, stage 1 ``bitfit`` only biases, so a
run started from stage 1 holds stage 0's query weight only when the chain was followed
back to stage 0 through stage 1's config.yaml."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_config
from fedfm.config import from_dict
from fedfm.personalize.init_from import run_chain
from fedfm.runtime.workbench import Workbench

WEIGHT = "bert.encoder.layer.0.attention.self.query.weight"
BIAS = "bert.encoder.layer.0.attention.self.query.bias"


def stage_raws(data_dir: Path) -> list[dict]:
    first = tiny_config(data_dir, rounds=1, peft={"method": "full"}, **{"train.steps": 1, "train.lr": 1e-3})
    second = tiny_config(data_dir, rounds=1, peft={"method": "bitfit"}, **{"train.steps": 1})
    return [first, second]


def loaded(data_dir: Path, init_from: Path) -> dict[str, torch.Tensor]:
    """The weights a fresh ``full`` run started from ``init_from`` begins with."""
    raw = tiny_config(data_dir, peft={"method": "full"}, **{"model.init_from": str(init_from)})
    return {n: p.detach().clone() for n, p in Workbench(from_dict(raw)).model.named_parameters()}


def set_init_from(config_yaml: Path, value: str) -> None:
    """Write ``model.init_from`` into a run's config.yaml, as a run from before the fix left it."""
    saved = yaml.safe_load(config_yaml.read_text())
    saved["model"]["init_from"] = value
    config_yaml.write_text(yaml.safe_dump(saved, sort_keys=False))


@pytest.fixture
def relative_chain(tmp_path, monkeypatch):
    """A 2-stage chain run with a relative ``--out`` from ``tmp_path/work``, whose stage 1
    config.yaml is then made to hold the relative path (the old way): (work dir, chain dir)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    run_chain(stage_raws(tmp_path), "runs/chain")
    chain = work / "runs" / "chain"
    # newly written: absolute, resolved
    assert yaml.safe_load((chain / "stage-1" / "config.yaml").read_text())["model"]["init_from"] == str(
        (chain / "stage-0").resolve()
    )
    set_init_from(chain / "stage-1" / "config.yaml", "runs/chain/stage-0")
    return work, chain


def test_a_relative_chain_loads_the_same_weights_from_another_working_directory(relative_chain, tmp_path, monkeypatch):
    work, chain = relative_chain
    s0 = load_file(str(chain / "stage-0" / "final.safetensors"))
    s1 = load_file(str(chain / "stage-1" / "final.safetensors"))
    assert WEIGHT in s0 and WEIGHT not in s1 and BIAS in s1
    here = loaded(tmp_path, chain / "stage-1")  # from the directory the chain ran in
    assert torch.equal(here[WEIGHT], s0[WEIGHT]) and torch.equal(here[BIAS], s1[BIAS])  # stage 0 was followed

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert not Path("runs/chain/stage-0").exists()
    there = loaded(tmp_path, chain / "stage-1")
    assert there.keys() == here.keys() and all(torch.equal(there[k], here[k]) for k in here)
    # ... and a .safetensors file of the run as init_from follows the same chain
    by_file = loaded(tmp_path, chain / "stage-1" / "final.safetensors")
    assert all(torch.equal(by_file[k], here[k]) for k in here)


def test_a_chain_whose_earlier_run_is_gone_names_the_config_yaml_and_the_candidates(relative_chain, tmp_path, monkeypatch):
    work, chain = relative_chain
    shutil.rmtree(chain / "stage-0")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(FileNotFoundError) as err:
        loaded(tmp_path, chain / "stage-1")
    text = str(err.value)
    assert "started from runs/chain/stage-0" in text and str(chain / "stage-1" / "config.yaml") in text
    assert "which is not found" in text and str(elsewhere / "runs/chain/stage-0") in text
    assert str(work / "runs/chain/stage-0") in text  # the walk up from the run folder was tried


def test_a_relative_path_that_names_two_different_runs_is_refused_not_guessed(relative_chain, tmp_path, monkeypatch):
    """From a directory holding another ``runs/chain/stage-0``, the relative path could mean
    that run or the one beside the chain: refused. From the chain's own directory both
    readings are the same run, and it loads."""
    work, chain = relative_chain
    other = tmp_path / "other"
    (other / "runs" / "chain" / "stage-0").mkdir(parents=True)
    shutil.copy(chain / "stage-1" / "final.safetensors", other / "runs" / "chain" / "stage-0" / "final.safetensors")
    monkeypatch.chdir(other)
    with pytest.raises(FileNotFoundError, match=r"two different runs; write the right one as an absolute path"):
        loaded(tmp_path, chain / "stage-1")
    monkeypatch.chdir(work)
    assert torch.equal(loaded(tmp_path, chain / "stage-1")[WEIGHT], load_file(str(chain / "stage-0" / "final.safetensors"))[WEIGHT])


def test_a_stages_file_with_a_relative_out_records_absolute_paths(tmp_path, monkeypatch):
    import json

    from fedfm.runtime.checkpoint import config_digest
    from fedfm.runtime.local import run_local
    from fedfm.stages import load_stages, plan

    first, second = stage_raws(tmp_path)
    second.update(rounds=2, server={"keep_checkpoints": 5})
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"name": "a", "config": first}, {"name": "b", "config": second}]}))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _, stages = load_stages(path, "runs/st")
    want = str((work / "runs" / "st" / "a").resolve())
    assert stages[1].exp.model.init_from == want and Path(want).is_absolute()
    for st in stages:
        run_local(st.exp, st.out, progress=False)
    b = work / "runs" / "st" / "b"
    assert yaml.safe_load((b / "config.yaml").read_text())["model"]["init_from"] == want
    assert plan(load_stages(path, "runs/st")[1], resume=True, overwrite=False) == ["skip", "skip"]

    # Stage b as older fedfm left it: relative init_from in its config.yaml (finished: still
    # skipped under --resume) and in its checkpoints' config (interrupted after round 1:
    # resumes with that spelling kept, the round loop sees no changed config).
    set_init_from(b / "config.yaml", "runs/st/a")
    assert plan(load_stages(path, "runs/st")[1], resume=True, overwrite=False) == ["skip", "skip"]
    for name in ("final.safetensors", "summary.json"):
        (b / name).unlink()
    shutil.rmtree(b / "checkpoints" / "round-000002")
    exp = stages[1].exp
    legacy = exp.model_copy(update={"model": exp.model.model_copy(update={"init_from": "runs/st/a"})})
    for ck in (b / "checkpoints").glob("round-*/checkpoint.json"):
        info = json.loads(ck.read_text())
        info["config"]["model"]["init_from"] = "runs/st/a"
        info["config_digest"] = config_digest(legacy)
        ck.write_text(json.dumps(info))
    again = load_stages(path, "runs/st")[1]
    assert again[1].exp.model.init_from == "runs/st/a"
    assert plan(again, resume=True, overwrite=False) == ["skip", "resume"]
    run_local(again[1].exp, again[1].out, progress=False, resume=True)
    assert (b / "final.safetensors").is_file()
    assert yaml.safe_load((b / "config.yaml").read_text())["model"]["init_from"] == want  # recorded absolute again

    # a single run given a relative init_from records it absolute in its config.yaml
    single = tiny_config(tmp_path, rounds=1, peft={"method": "full"}, **{"train.steps": 1, "model.init_from": "runs/st/b"})
    run_local(from_dict(single), Path("runs/single"), progress=False)
    saved = yaml.safe_load((work / "runs/single/config.yaml").read_text())
    assert saved["model"]["init_from"] == str(b.resolve())
