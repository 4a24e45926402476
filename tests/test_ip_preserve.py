"""Distillation on public text while a watermark is embedded (ip/preserve.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import ValidationError

from conftest import make_toy_csv, tiny_config
from fedfm.config import from_dict
from fedfm.ip import EmbedSettings, TriggerSpec, embed, trigger_set
from fedfm.ip.loading import build_base
from fedfm.ip.preserve import PreserveParams, build_preserver, kl_to_reference
from fedfm.runtime import LocalRuntime

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_kl_by_hand():
    # old softmax([0, 0]) = (0.5, 0.5); new softmax([ln 9, 0]) = (0.9, 0.1):
    # KL = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.5 (-0.587787) + 0.5 (1.609438) = 0.510826
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[math.log(9.0), 0.0]])
    assert kl_to_reference(old, new).item() == pytest.approx(0.510826, abs=1e-6)
    assert kl_to_reference(old, old).item() == pytest.approx(0.0, abs=1e-7)
    # (B, T, V) logits: the masked position (a huge difference) does not count; the mean is
    # over the one valid position, 0.510826.
    old3 = torch.zeros(1, 2, 2)
    new3 = torch.tensor([[[math.log(9.0), 0.0], [50.0, -50.0]]])
    assert kl_to_reference(old3, new3, torch.tensor([[1, 0]])).item() == pytest.approx(0.510826, abs=1e-6)


def test_unknown_public_source_is_refused_by_name():
    with pytest.raises(ValidationError, match="preserve.data.source 'no_such_corpus' is not a data source"):
        PreserveParams(data={"source": "no_such_corpus"})
    with pytest.raises(ValidationError, match="weight"):
        PreserveParams(data={"source": "file", "path": "x.csv"}, weight=0)


def test_preserve_holds_the_outputs_on_public_text(tmp_path):
    public = tmp_path / "public.csv"
    make_toy_csv(public, n=64, seed=3)
    exp = from_dict(tiny_config(tmp_path, **{"model.num_labels": 4}))
    base, template = build_base(exp)
    spec = TriggerSpec("text_classification", size=16, length=8, num_labels=4)
    trig = trigger_set("k", spec, base.tokenizer)
    params = PreserveParams(data={"source": "file", "path": str(public)}, examples=32, weight=5.0, batch_size=32)

    def public_kl(state) -> float:  # KL(template || state) on all 32 public texts, eval mode
        keeper = build_preserver(params, base.task, base.tokenizer, seed=0)
        from fedfm.peft import set_state

        set_state(base.model, state)
        names = [n for n, p in base.model.named_parameters() if p.requires_grad]
        keeper.reference = {n: template[n] for n in names}
        base.model.eval()
        with torch.no_grad():
            # a generator that draws every example: batch_size 32 of 32 (with replacement)
            return float(keeper.loss(base.model, base.task, base.tokenizer, torch.Generator().manual_seed(1))) / params.weight

    plain = embed(base.model, base.task, spec.task, base.tokenizer, template, trig, EmbedSettings(1.01, 30, 0.05, 16, ()), seed=0)
    keeper = build_preserver(params, base.task, base.tokenizer, seed=0)
    kept = embed(base.model, base.task, spec.task, base.tokenizer, template, trig,
                 EmbedSettings(1.01, 30, 0.05, 16, (), preserve=keeper), seed=0)
    # threshold 1.01: both spend the whole budget
    assert plain.steps == kept.steps == 30 and plain.preserve_kl is None and kept.preserve_kl is not None
    # the same trigger steps; with the KL term the outputs on public text moved less
    assert public_kl(kept.state) < 0.5 * public_kl(plain.state)
    assert len(keeper.examples) == 32


def test_waffle_step_with_preserve_reports_the_kl(tmp_path):
    public = tmp_path / "public.csv"
    make_toy_csv(public, n=40, seed=5)
    waffle = {"name": "waffle", "key": "owner-key", "trigger_size": 16, "trigger_length": 8, "threshold": 1.0,
              "max_steps": 6, "lr": 0.05, "freeze": [], "preserve": {"data": {"source": "file", "path": str(public)}, "examples": 16}}
    run = tmp_path / "run"
    LocalRuntime(from_dict(tiny_config(tmp_path, **{"model.num_labels": 4, "server_steps": [waffle], "rounds": 1})), run).run()
    row = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1]
    assert row["waffle.steps"] == 6 and row["waffle.preserve_kl"] >= 0.0


def test_random_texts_join_the_public_texts(tmp_path):
    from fedfm.ip.preserve import random_texts

    public = tmp_path / "public.csv"
    make_toy_csv(public, n=40, seed=5)
    exp = from_dict(tiny_config(tmp_path, **{"model.num_labels": 4}))
    base, _ = build_base(exp)
    params = PreserveParams(data={"source": "file", "path": str(public)}, examples=10, random_texts=3)
    keeper = build_preserver(params, base.task, base.tokenizer, seed=0, length=5)
    # 10 public texts + 3 random ones of 5 tokens between the sentence markers
    assert len(keeper.examples) == 13
    extra = keeper.examples[10:]
    assert extra == random_texts(3, 5, base.tokenizer, seed=1)  # seed + 1: not the public draw's
    special = set(base.tokenizer.all_special_ids or [])
    for ex in extra:  # [CLS] + 5 random non-special tokens + [SEP]
        ids = ex["input_ids"]
        assert len(ids) == 7 and ids[0] == base.tokenizer.cls_token_id and ids[-1] == base.tokenizer.sep_token_id
        assert not special & set(ids[1:-1])
    assert extra != random_texts(3, 5, base.tokenizer, seed=2)
    with pytest.raises(ValidationError, match="random_texts"):
        PreserveParams(data={"source": "file", "path": str(public)}, random_texts=-1)


def _distinct_csv(path, n: int = 48, per_group: int = 4) -> None:
    """``n`` distinct texts, ``per_group`` per group (12 groups of 4 for 48)."""
    import pandas as pd

    rows = [{"text": f"review number {i} of the film", "label": i % 2, "group": f"g{i // per_group}"} for i in range(n)]
    pd.DataFrame(rows).to_csv(path, index=False)


def test_exclude_run_keeps_only_the_texts_the_run_does_not_use(tmp_path):
    from fedfm.ip.preserve import public_examples, run_texts

    csv = tmp_path / "toy.csv"
    _distinct_csv(csv)
    exp = from_dict(tiny_config(tmp_path, **{"federation.test_examples": 8, "federation.examples_per_client": 10}))
    # 12 groups of 4: the test set takes exactly 2 whole groups (8 rows); the 2 clients share the
    # other 10 groups (40 rows) and train on 10 each: 8 + 20 = 28 texts used, 48 - 28 = 20 left.
    used = run_texts(exp)
    assert len(used) == 28
    base, _ = build_base(exp)
    params = PreserveParams(data={"source": "file", "path": str(csv)}, examples=100, exclude_run=True)
    kept = public_examples(params, base.task, base.tokenizer, seed=0, run=exp)
    assert len(kept) == 20
    texts = {base.tokenizer.decode(e["input_ids"], skip_special_tokens=True) for e in kept}
    assert not texts & used and len(texts) == 20
    # without exclude_run every text is drawn, the run's own ones included
    assert len(public_examples(params.model_copy(update={"exclude_run": False}), base.task, base.tokenizer, seed=0)) == 48
    with pytest.raises(ValueError, match="run's config is needed"):
        public_examples(params, base.task, base.tokenizer, seed=0)


def test_the_runs_own_data_as_public_text_is_refused_without_exclude_run(tmp_path):
    from fedfm.overrides import ConfigError

    raw = tiny_config(tmp_path, **{"model.num_labels": 2})
    own = {"source": "file", "path": raw["data"]["path"]}
    waffle = {"name": "waffle", "key": "k", "trigger_size": 24, "preserve": {"data": own}}
    with pytest.raises(ConfigError, match=r"server_steps\[0\].preserve.data is the run's own data .*"
                       r"server_steps\[0\].preserve.exclude_run: true"):
        from_dict({**raw, "server_steps": [waffle]})
    waffle["preserve"]["exclude_run"] = True
    from_dict({**raw, "server_steps": [waffle]})
    waffle["preserve"] = {"data": {"source": "file", "path": str(tmp_path / "public.csv")}}  # another file
    from_dict({**raw, "server_steps": [waffle]})


def test_recenter_restores_the_mean_logits_on_public_text(tmp_path):
    from fedfm.ip.recenter import head_bias, mean_logits, recenter
    from fedfm.peft import set_state

    public = tmp_path / "public.csv"
    make_toy_csv(public, n=24, seed=7)
    exp = from_dict(tiny_config(tmp_path, **{"model.num_labels": 2}))
    base, template = build_base(exp)
    params = PreserveParams(data={"source": "file", "path": str(public)}, examples=24, recenter=True)
    keeper = build_preserver(params, base.task, base.tokenizer, seed=0)
    set_state(base.model, template)
    name, bias = head_bias(base.model)
    assert "classifier" in name and bias.shape == (2,)
    keeper.start(base.model, [])  # the reference: the head bias at its start, nothing else
    start = mean_logits(base.model, base.task, base.tokenizer, keeper.examples)
    with torch.no_grad():
        bias.add_(torch.tensor([1.5, -0.5]))  # every logit of class 0 up by 1.5, of class 1 down by 0.5
    moved = mean_logits(base.model, base.task, base.tokenizer, keeper.examples)
    assert torch.allclose(moved - start, torch.tensor([1.5, -0.5]), atol=1e-5)
    keeper.recenter_head(base.model, base.task, base.tokenizer)  # moves the bias back by (-1.5, +0.5)
    assert torch.allclose(bias.detach(), template[name], atol=1e-5)
    assert torch.allclose(mean_logits(base.model, base.task, base.tokenizer, keeper.examples), start, atol=1e-5)
    # the starting mean logits are computed once per embedding and kept: a second shift is
    # undone against the same target; a new start forgets it
    assert torch.allclose(keeper.target, start, atol=1e-6)
    kept = keeper.target
    with torch.no_grad():
        bias.add_(torch.tensor([-2.0, 1.0]))
    keeper.recenter_head(base.model, base.task, base.tokenizer)
    assert keeper.target is kept and torch.allclose(bias.detach(), template[name], atol=1e-5)
    keeper.start(base.model, [])
    assert keeper.target is None
    # direct call: the move it returns is the negative of the mean shift
    with torch.no_grad():
        bias.add_(torch.tensor([0.25, 0.25]))
    assert torch.allclose(recenter(base.model, base.task, base.tokenizer, keeper.examples, keeper.reference),
                          torch.tensor([-0.25, -0.25]), atol=1e-5)


def test_recenter_is_refused_for_a_causal_lm(tmp_path):
    from fedfm.ip.preserve import preserve_problems

    exp = from_dict(tiny_config(tmp_path))
    causal = exp.model_copy(update={"model": exp.model.model_copy(update={"task": "causal_lm"})})
    spec = {"data": {"source": "fortunes"}, "recenter": True}
    assert preserve_problems(spec, causal, "server_steps[0]") == [
        "server_steps[0].preserve.recenter moves a classification head's bias: text_classification only, "
        "not model.task 'causal_lm'"]
    assert preserve_problems(spec, exp, "server_steps[0]") == []


def test_an_embedding_with_recenter_ends_at_the_starting_mean_logits(tmp_path):
    from fedfm.ip.recenter import mean_logits
    from fedfm.peft import set_state

    public = tmp_path / "public.csv"
    make_toy_csv(public, n=32, seed=3)
    exp = from_dict(tiny_config(tmp_path, **{"model.num_labels": 4}))
    base, template = build_base(exp)
    spec = TriggerSpec("text_classification", size=16, length=8, num_labels=4)
    trig = trigger_set("k", spec, base.tokenizer)
    runs = {}
    for on in (False, True):
        params = PreserveParams(data={"source": "file", "path": str(public)}, examples=32, weight=1.0, recenter=on)
        keeper = build_preserver(params, base.task, base.tokenizer, seed=0)
        done = embed(base.model, base.task, spec.task, base.tokenizer, template, trig,
                     EmbedSettings(1.01, 12, 0.05, 16, (), preserve=keeper), seed=0)  # 12 steps: the whole budget
        set_state(base.model, done.state)
        runs[on] = mean_logits(base.model, base.task, base.tokenizer, keeper.examples)
    set_state(base.model, template)
    start = mean_logits(base.model, base.task, base.tokenizer, keeper.examples)
    assert (runs[False] - start).abs().max() > 1e-3  # the embedding (head trained too) moved the mean logits ...
    assert torch.allclose(runs[True], start, atol=1e-4)  # ... and the re-centering put them back


def test_public_text_is_read_before_the_model_loads(tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from fedfm import cli
    from fedfm.ip.preserve import check_public_data

    public = tmp_path / "public.csv"
    make_toy_csv(public, n=40, seed=5)
    waffle = {"name": "waffle", "key": "k", "trigger_size": 24, "preserve": {"data": {"source": "file", "path": str(public)}}}
    raw = tiny_config(tmp_path, **{"model.num_labels": 2, "server_steps": [waffle], "rounds": 1})
    assert check_public_data(from_dict(raw)) == ["server_steps[0].preserve.data: file, 40 texts"]
    waffle["preserve"]["data"]["path"] = str(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match=r"server_steps\[0\].preserve.data: data.path: file not found: .*missing.csv"):
        check_public_data(from_dict(raw))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    loaded = []
    monkeypatch.setattr("fedfm.cli._what_model", lambda exp: loaded.append(exp) or "")
    monkeypatch.setenv("COLUMNS", "1000")
    monkeypatch.setattr(cli.console, "width", 1000)
    result = CliRunner().invoke(cli.app, ["run", str(cfg), "--out", str(tmp_path / "run")])
    assert result.exit_code != 0 and "server_steps[0].preserve.data: data.path: file not found" in result.output, result.output
    assert loaded == [] and not (tmp_path / "run").exists()  # said before "loading model", nothing left behind
