"""SLoRA (Babakniya et al. 2023) on the tiny BERT of conftest (hidden 32, 2 layers): the
random-mask sparse stage (``peft.method: sparse``), its State loaded into the base weights
by ``model.init_from`` (``peft/merge_selected.py``), and LoRA initialised from the SVD of
that update (``peft: {method: lora, init: svd}``, ``peft/svd_init.py``)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from fedfm.config import ConfigError, from_dict
from fedfm.peft import count_params
from fedfm.peft.sparse import random_entries
from fedfm.peft.svd_init import factors
from fedfm.runtime.local import run_local
from fedfm.runtime.workbench import Workbench

HEAD = 32 * 2 + 2
QUERY0 = "bert.encoder.layer.0.attention.self.query"


def exp_of(tmp_path, peft, **over):
    return from_dict(tiny_config(tmp_path, peft=peft, **over), "<test>")


def pretrained(tmp_path, name=QUERY0):
    """The tiny model's weight of ``name`` as every run starts from it (seeded random init)."""
    wb = Workbench(exp_of(tmp_path, {"method": "full"}))
    return dict(wb.model.named_parameters())[name + ".weight"].detach().clone()


def test_sparse_trains_ceil_density_entries_of_each_target_with_one_seeded_mask(tmp_path):
    wb = Workbench(exp_of(tmp_path, {"method": "sparse", "density": 0.1, "target_modules": ["query", "value"]}))
    # 4 layers (q, v x 2) of 32x32 = 1024 entries: ceil(102.4) = 103 each, plus the head
    assert count_params(wb.model)[0] == 4 * 103 + HEAD
    a, b = random_entries(1024, 0.1, 0, 0), random_entries(1024, 0.1, 0, 0)
    assert torch.equal(a, b) and a.numel() == 103 and torch.equal(a, torch.sort(a).values)
    assert len(set(a.tolist())) == 103 and int(a.max()) < 1024
    assert not torch.equal(a, random_entries(1024, 0.1, 1, 0))  # another mask seed
    assert not torch.equal(a, random_entries(1024, 0.1, 0, 1))  # another layer


def test_factors_recover_a_low_rank_update_and_drop_what_is_beyond_rank_r():
    u, v = torch.tensor([1.0, 2.0, 0.0, 2.0]), torch.tensor([0.0, 3.0, 4.0])
    delta = torch.outer(u, v)  # rank 1, singular value |u| |v| = 3 * 5 = 15
    b, a, live = factors(delta, r=2, scaling=2.0)
    assert live.tolist() == [True, False]  # the second slot keeps peft's default init
    assert torch.allclose(2.0 * b @ a, delta.double(), atol=1e-12)
    assert math.isclose(float(torch.linalg.norm(b[:, 0])) ** 2, 15 / 2, rel_tol=1e-12)  # |B|^2 = s / scaling
    b1, a1, _ = factors(torch.diag(torch.tensor([3.0, 1.0, 0.0])), r=1, scaling=1.0)
    assert torch.allclose(b1 @ a1, torch.diag(torch.tensor([3.0, 0.0, 0.0])).double())  # the residual: 1 / sqrt(10)


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    exp = exp_of(root, {"method": "sparse", "density": 0.1, "target_modules": ["query", "value"]}, rounds=1)
    run_local(exp, root / "stage1", progress=False)
    return root, root / "stage1"


def test_init_from_a_sparse_run_writes_its_entries_into_the_weights(sparse_run, tmp_path):
    root, run = sparse_run
    values = load_file(str(run / "final.safetensors"))[QUERY0 + ".parametrizations.weight.0.values"]
    w0 = pretrained(root)
    wb = Workbench(exp_of(root, {"method": "full"}, **{"model.init_from": str(run)}))
    w1 = dict(wb.model.named_parameters())[QUERY0 + ".weight"].detach()
    index = random_entries(1024, 0.1, 0, 0)  # query of layer 0 is the first targeted layer
    assert torch.equal(w1.reshape(-1)[index], values)
    rest = torch.ones(1024, dtype=torch.bool)
    rest[index] = False
    assert torch.equal(w1.reshape(-1)[rest], w0.reshape(-1)[rest])
    assert not torch.equal(values, w0.reshape(-1)[index])  # the stage trained them
    # without the run's config beside the State the entries cannot be placed: refused, named
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(run / "final.safetensors", alone / "final.safetensors")
    with pytest.raises(ValueError, match="no config.yaml beside it"):
        Workbench(exp_of(root, {"method": "full"}, **{"model.init_from": str(alone / "final.safetensors")}))


def test_init_from_a_salience_run_is_loaded_not_skipped(tmp_path):
    exp = exp_of(tmp_path, {"method": "salience", "fraction": 0.25, "target_modules": ["query"]}, rounds=1)
    run_local(exp, tmp_path / "sal", progress=False)
    values = load_file(str(tmp_path / "sal" / "final.safetensors"))[QUERY0 + ".parametrizations.weight.0.values"]
    wb = Workbench(exp_of(tmp_path, {"method": "full"}, **{"model.init_from": str(tmp_path / "sal")}))
    w1 = dict(wb.model.named_parameters())[QUERY0 + ".weight"].detach()
    rows = [i for i in range(32) if torch.equal(w1[i], values[0])]
    assert len(rows) == 1 and values.shape == (8, 32)  # 25% of 32 rows, written in place


def test_lora_svd_starts_from_the_truncated_update_on_the_pretrained_base(sparse_run):
    root, run = sparse_run
    w0 = pretrained(root)
    wb1 = Workbench(exp_of(root, {"method": "full"}, **{"model.init_from": str(run)}))
    delta = dict(wb1.model.named_parameters())[QUERY0 + ".weight"].detach().double() - w0.double()  # (32, 32)
    for r in (4, 32):
        peft = {"method": "lora", "r": r, "alpha": 2 * r, "init": "svd", "target_modules": ["query", "value"]}
        wb = Workbench(exp_of(root, peft, **{"model.init_from": str(run)}))
        layer = wb.model.get_submodule("base_model.model." + QUERY0)
        assert torch.equal(layer.base_layer.weight, w0)  # the frozen base is the pretrained weight again
        approx = 2.0 * layer.lora_B["default"].weight.detach().double() @ layer.lora_A["default"].weight.detach().double()
        s = torch.linalg.svdvals(delta)
        best = torch.linalg.norm(delta - approx) / torch.linalg.norm(delta)
        assert math.isclose(float(best), float(torch.sqrt((s[r:] ** 2).sum()) / torch.linalg.norm(delta)), abs_tol=1e-6)
    # at full rank the LoRA model computes what the sparse stage ended with
    batch = {k: v for k, v in wb.task.collate(wb.examples(0)[:4], wb.tokenizer).items()}
    with torch.no_grad():
        assert torch.allclose(wb.model(**batch).logits, wb1.model(**batch).logits, atol=1e-5)


def test_lora_svd_needs_an_earlier_run_that_changed_its_targets(sparse_run):
    root, run = sparse_run
    with pytest.raises(ConfigError, match="peft.init: svd starts LoRA from the update of an earlier run"):
        exp_of(root, {"method": "lora", "init": "svd"})
    with pytest.raises(ConfigError, match="peft.init: svd is implemented for peft.method lora only"):
        exp_of(root, {"method": "ffa_lora", "init": "svd"}, **{"model.init_from": str(run)})
    with pytest.raises(ValueError, match="changed none of the LoRA target layers"):
        Workbench(exp_of(root, {"method": "lora", "init": "svd", "target_modules": ["key"]}, **{"model.init_from": str(run)}))


def test_a_stages_file_runs_slora_and_at_full_rank_the_lora_stage_starts_where_the_sparse_one_ended(tmp_path, monkeypatch):
    import json

    import yaml

    from conftest import invoke

    sparse = tiny_config(tmp_path, rounds=1, peft={"method": "sparse", "density": 0.1, "target_modules": ["query", "value"]})
    lora = tiny_config(tmp_path, rounds=1, peft={"method": "lora", "r": 32, "alpha": 64, "init": "svd",
                                                  "target_modules": ["query", "value"]})
    path = tmp_path / "slora.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"name": "sparse", "config": sparse}, {"name": "lora", "config": lora}]}))
    result, text = invoke(monkeypatch, "run", str(path), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, text
    first, second = ([json.loads(x) for x in (tmp_path / "out" / s / "metrics.jsonl").read_text().splitlines()]
                     for s in ("sparse", "lora"))
    assert first[-1]["loss"] != first[0]["loss"]  # the sparse stage trained
    assert math.isclose(second[0]["loss"], first[-1]["loss"], abs_tol=1e-5)  # r = 32: the whole update is in B A


def test_a_salience_run_that_started_from_another_is_merged_on_the_weights_it_ranked(tmp_path):
    from fedfm.peft.salience import salience_scores, select_top
    from fedfm.personalize.init_from import run_chain

    first = tiny_config(tmp_path, rounds=1, peft={"method": "full"}, **{"train.steps": 1, "train.lr": 0.05})
    second = tiny_config(tmp_path, rounds=1, peft={"method": "salience", "fraction": 0.25, "target_modules": ["query"]})
    run_chain([first, second], tmp_path / "chain")
    w_first = load_file(str(tmp_path / "chain" / "stage-0" / "final.safetensors"))[QUERY0 + ".weight"]
    values = load_file(str(tmp_path / "chain" / "stage-1" / "final.safetensors"))[QUERY0 + ".parametrizations.weight.0.values"]
    rows = select_top(salience_scores(w_first, "l1", "row"), 0.25)  # ranked on stage 0's weights, as stage 1 did
    assert not torch.equal(rows, select_top(salience_scores(pretrained(tmp_path), "l1", "row"), 0.25))
    wb = Workbench(exp_of(tmp_path, {"method": "full"}, **{"model.init_from": str(tmp_path / "chain" / "stage-1")}))
    w = dict(wb.model.named_parameters())[QUERY0 + ".weight"].detach()
    assert torch.equal(w[rows], values)
    rest = torch.ones(32, dtype=torch.bool)
    rest[rows] = False
    assert torch.equal(w[rest], w_first[rest])


def test_after_a_longer_chain_the_lora_base_is_what_the_sparse_stage_started_from(tmp_path):
    from fedfm.personalize.init_from import run_chain

    first = tiny_config(tmp_path, rounds=1, peft={"method": "full"}, **{"train.steps": 1, "train.lr": 0.05})
    second = tiny_config(tmp_path, rounds=1, peft={"method": "sparse", "density": 0.1, "target_modules": ["query", "value"]})
    run_chain([first, second], tmp_path / "chain")
    w_first = load_file(str(tmp_path / "chain" / "stage-0" / "final.safetensors"))[QUERY0 + ".weight"]
    peft = {"method": "lora", "r": 32, "alpha": 64, "init": "svd", "target_modules": ["query", "value"]}
    wb = Workbench(exp_of(tmp_path, peft, **{"model.init_from": str(tmp_path / "chain" / "stage-1")}))
    layer = wb.model.get_submodule("base_model.model." + QUERY0)
    assert torch.equal(layer.base_layer.weight, w_first)  # W0 = stage 0's weight, not the pretrained one
    delta = 2.0 * layer.lora_B["default"].weight.detach() @ layer.lora_A["default"].weight.detach()
    assert int((delta.abs() > 1e-6).sum()) <= 103  # only the sparse stage's 103 entries moved
