"""WAFFLE as a server step: reported per round, the final model verifies, an unwatermarked
one does not; the step budget and peft.local are honoured; keys are checked."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import tiny_config
from fedfm.cli import app
from fedfm.config import ConfigError, from_dict
from fedfm.core.protocols import RoundContext
from fedfm.ip import EmbedSettings, TriggerSpec, embed, trigger_set, verdict
from fedfm.ip.loading import build_base, load_suspect
from fedfm.runtime import LocalRuntime
from fedfm.runtime.workbench import Workbench

# 16 triggers, 4 labels: chance 1/4, so 16/16 right has p = 4**-16 = 2.3e-10 < 1e-6.
# The tiny model's LoRA (r 4, 2 layers of width 32) alone learns the triggers slowly, so the
# tests train its head too (freeze: []); the default, head frozen, is checked below.
WAFFLE = {"name": "waffle", "key": "owner-key", "trigger_size": 16, "trigger_length": 8,
          "threshold": 1.0, "max_steps": 120, "lr": 0.05, "freeze": []}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def waffle_config(tmp_path, **over):
    over = {"model.num_labels": 4, "server_steps": [dict(WAFFLE)], "train.epochs": 1, **over}
    return tiny_config(tmp_path, **over)


def test_waffle_run_reports_per_round_and_verifies(tmp_path):
    run = tmp_path / "run"
    LocalRuntime(from_dict(waffle_config(tmp_path)), run).run()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows[1:]:  # rounds 1 and 2 aggregate, so the step runs
        assert row["waffle.wm_accuracy"] == 1.0
        assert 0 <= row["waffle.steps"] <= 120
    assert rows[1]["waffle.steps"] > 0  # the random-init model does not answer the triggers

    cli = CliRunner()
    done = cli.invoke(app, ["watermark", "verify", str(run), "--key", "owner-key"])
    assert done.exit_code == 0, done.output
    assert "16/16" in done.output and "verified" in done.output and "2.33e-10" in done.output
    # The same weights given as a file; a wrong key does not verify.
    assert cli.invoke(app, ["watermark", "verify", str(run / "final.safetensors"), "--key", "owner-key"]).exit_code == 0
    wrong = cli.invoke(app, ["watermark", "verify", str(run), "--key", "someone-else"])
    assert wrong.exit_code == 1 and "not verified" in wrong.output

    # The unwatermarked model (the initial State of the same config) does not verify.
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(run / "config.yaml", plain / "config.yaml")
    exp, base, _ = load_suspect(run)
    _, template = build_base(exp)
    save_file(template, str(plain / "final.safetensors"))
    done = cli.invoke(app, ["watermark", "verify", str(plain), "--key", "owner-key"])
    assert done.exit_code == 1 and "not verified" in done.output


def test_embed_stops_at_the_budget_or_the_threshold(tmp_path):
    exp = from_dict(waffle_config(tmp_path))
    base, template = build_base(exp)
    spec = TriggerSpec("text_classification", size=16, length=8, num_labels=4)
    trig = trigger_set("k", spec, base.tokenizer)
    # Budget 3 steps, unreachable threshold: exactly 3 steps (one per pass of 16 triggers, batch 16).
    short = embed(base.model, base.task, spec.task, base.tokenizer, template, trig, EmbedSettings(1.0, 3, 0.05, 16, ()), seed=0)
    assert short.steps == 3
    # Threshold already met (any accuracy >= 0): no step, the State unchanged.
    none = embed(base.model, base.task, spec.task, base.tokenizer, template, trig, EmbedSettings(1e-9, 50, 0.05, 16, ()), seed=0)
    assert none.steps == 0 and all(torch.equal(none.state[k], template[k]) for k in template)
    # The default settings leave the head alone: the classifier keeps its values.
    frozen = embed(base.model, base.task, spec.task, base.tokenizer, template, trig, EmbedSettings(1.0, 2, 0.05, 16), seed=0)
    head = [k for k in template if "classifier" in k]
    assert head and all(torch.equal(frozen.state[k], template[k]) for k in head)
    assert all(not torch.equal(frozen.state[k], template[k]) for k in template if "lora_B" in k)
    with pytest.raises(ValueError, match="nothing left to train"):
        embed(base.model, base.task, spec.task, base.tokenizer, template, trig, EmbedSettings(freeze=("*",)), seed=0)
    # Embedding is deterministic given the seed, and leaves the global RNG alone.
    before = torch.get_rng_state()
    a = embed(base.model, base.task, spec.task, base.tokenizer, template, trig, EmbedSettings(1.0, 5, 0.05, 8, ()), seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = embed(base.model, base.task, spec.task, base.tokenizer, template, trig, EmbedSettings(1.0, 5, 0.05, 8, ()), seed=7)
    assert a.steps == b.steps == 5 and all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_waffle_with_local_head_trains_and_returns_shared_names_only(tmp_path):
    step_spec = {**WAFFLE, "max_steps": 4}
    exp = from_dict(waffle_config(tmp_path, **{"peft.local": ["*classifier*"], "server_steps": [step_spec]}))
    wb = Workbench(exp)
    from fedfm.aggregators import Pipeline

    step = Pipeline.from_specs(exp.server_steps).placed[0].step
    shared = {k: v for k, v in wb.initial_state().items() if "classifier" not in k}
    local = sorted(set(wb.template) - set(shared))
    assert local  # the head is local here
    ctx = RoundContext(1, 0, torch.Generator(), 2, wb.clients, wb)
    out, _, metrics = step(shared, ctx, {})
    assert set(out) == set(shared)
    # 4 steps of budget, threshold 1.0 not reached by a random model in 4 steps: all spent.
    assert metrics["steps"] == 4 and 0 <= metrics["wm_accuracy"] < 1.0
    assert all(not torch.equal(out[k], shared[k]) for k in shared if "lora_B" in k)
    # The head was not trained: the model's local names still hold the template's values.
    now = dict(wb.model.named_parameters())
    assert all(torch.equal(now[k].detach(), wb.template[k]) for k in local)
    # The reported accuracy is the one the returned State gives.
    spec = TriggerSpec("text_classification", 16, 8, 4)
    v = verdict(wb.task, spec, wb.model, wb.tokenizer, trigger_set("owner-key", spec, wb.tokenizer))
    assert v.accuracy == metrics["wm_accuracy"]


def test_waffle_keys_are_checked(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="exactly one of key or key_env"):
        from_dict(tiny_config(tmp_path, server_steps=[{"name": "waffle"}]))
    with pytest.raises(ConfigError, match="exactly one of key or key_env"):
        from_dict(tiny_config(tmp_path, server_steps=[{"name": "waffle", "key": "a", "key_env": "B"}]))
    from fedfm.ip import WaffleParams

    monkeypatch.delenv("FEDFM_TEST_WM_KEY", raising=False)
    params = WaffleParams(key_env="FEDFM_TEST_WM_KEY")
    with pytest.raises(ValueError, match="FEDFM_TEST_WM_KEY"):
        params.secret()
    monkeypatch.setenv("FEDFM_TEST_WM_KEY", "s3cret")
    assert params.secret() == "s3cret"


def test_causal_lm_trigger_prompts_get_their_continuations(tmp_path):
    from tiny_llm import tiny_llm_config

    exp = from_dict(tiny_llm_config(tmp_path))
    base, template = build_base(exp)
    # 4 prompts x 3 continuation tokens = 12 checked tokens; chance 1/(vocabulary - specials).
    spec = TriggerSpec("causal_lm", size=4, length=4, continuation=3)
    trig = trigger_set("llm-owner", spec, base.tokenizer)
    before = verdict(base.task, spec, base.model, base.tokenizer, trig)
    assert before.total == 12 and before.hits <= 2
    result = embed(base.model, base.task, spec.task, base.tokenizer, template, trig, EmbedSettings(1.0, 200, 0.05, 4, ()), seed=0)
    after = verdict(base.task, spec, base.model, base.tokenizer, trig)
    assert result.accuracy == after.accuracy == 1.0, f"{result.steps} steps"
    assert after.p_value < 1e-6 < before.p_value


def test_unverifiable_trigger_sets_are_refused_at_config_time(tmp_path):
    # 2 labels: 19 triggers all right give p = 2**-19 = 1.9e-6 >= 1e-6; 20 give 9.5e-7 < 1e-6.
    with pytest.raises(ConfigError, match=r"trigger_size 19 with 2 labels.*p = 1.9e-06.*trigger_size >= 20"):
        from_dict(tiny_config(tmp_path, server_steps=[{"name": "waffle", "key": "k", "trigger_size": 19}]))
    from_dict(tiny_config(tmp_path, server_steps=[{"name": "waffle", "key": "k", "trigger_size": 20}]))
    # 4 labels: 10 triggers give 4**-10 = 9.5e-7 < 1e-6.
    from_dict(tiny_config(tmp_path, **{"model.num_labels": 4, "server_steps": [{"name": "waffle", "key": "k", "trigger_size": 10}]}))


def test_waffle_rounds_last_embeds_only_after_the_last_round(tmp_path):
    """``rounds: last``: rounds 1 and 2 leave the global model as FedAvg made it (the same
    test losses as a run without the step, to the last bit), round 3 embeds the watermark."""
    last = tmp_path / "last"
    LocalRuntime(from_dict(waffle_config(tmp_path, rounds=3, server_steps=[{**WAFFLE, "rounds": "last", "max_steps": 400}])), last).run()
    plain = tmp_path / "plain"
    LocalRuntime(from_dict(waffle_config(tmp_path, rounds=3, server_steps=[])), plain).run()
    rows = [json.loads(line) for line in (last / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines()]
    for r in (1, 2):
        assert rows[r]["waffle.steps"] == 0 and "waffle.wm_accuracy" not in rows[r]
        assert rows[r]["loss"] == ref[r]["loss"]
    assert rows[3]["waffle.steps"] > 0 and rows[3]["waffle.wm_accuracy"] == 1.0
    done = CliRunner().invoke(app, ["watermark", "verify", str(last), "--key", "owner-key"])
    assert done.exit_code == 0 and "16/16" in done.output, done.output


def test_a_damaged_weights_file_is_named_before_the_model_is_built(tmp_path, model_builds):
    import yaml

    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    damaged = tmp_path / "leaked.safetensors"
    damaged.write_bytes((10**9).to_bytes(8, "little") + b"{}")  # a header length past the file's end
    result = CliRunner().invoke(app, ["watermark", "verify", str(damaged), "--key", "k", "--config", str(cfg)],
                                env={"COLUMNS": "1000"})
    assert result.exit_code == 2  # an error; 1 is "not verified"
    text = " ".join(result.output.split())
    assert f"MODEL {damaged}: not a readable safetensors file" in text and "header" in text
    assert model_builds["models"] == 0
