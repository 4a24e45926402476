"""A refused --resume names each changed config field with both values."""

from __future__ import annotations

import pytest
from conftest import tiny_config

from fedfm.config import from_dict
from fedfm.runtime.checkpoint import config_changes
from fedfm.runtime.local import LocalRuntime
from fedfm.runtime.loop import ResumeError


def test_config_changes_by_hand():
    old = {"train": {"lr": 0.01, "batch_size": 8}, "federation": {"roles": [{"name": "a"}]}, "seed": 0}
    new = {"train": {"lr": 0.02, "batch_size": 8}, "federation": {"roles": []}, "seed": 0}
    assert config_changes(old, new) == ["federation.roles: was [{'name': 'a'}], now []", "train.lr: was 0.01, now 0.02"]
    assert config_changes({"a": {"b": None}}, {"a": {"b": "x" * 70}}) == [f"a.b: was (unset), now '{'x' * 56}..."]
    assert config_changes(old, old) == []


def test_a_resume_with_another_lr_names_the_field(tmp_path):
    raw = tiny_config(tmp_path, rounds=1, **{"train.steps": 1})
    LocalRuntime(from_dict(raw, "<test>"), tmp_path / "run").run()
    raw2 = tiny_config(tmp_path, rounds=2, **{"train.steps": 1, "train.lr": 0.02})
    with pytest.raises(ResumeError, match=r"--resume: the config differs from the checkpointed run: train.lr: was 0.01, "
                                          r"now 0.02 \(only rounds, runtime, name, tracking may change"):
        LocalRuntime(from_dict(raw2, "<test>"), tmp_path / "run", resume=True).run()
    LocalRuntime(from_dict(tiny_config(tmp_path, rounds=2, **{"train.steps": 1}), "<test>"), tmp_path / "run", resume=True).run()


def test_math_lever_changes_by_hand():
    from fedfm.runtime.checkpoint import math_lever_changes

    seq = {"transport": "sequential", "device": "cpu", "batch_clients": 4, "batch_kernel": "auto"}
    assert math_lever_changes(seq, {**seq, "transport": "processes", "workers": 2}) == []  # the same bits
    assert math_lever_changes(seq, {**seq, "transport": "batched", "batch_clients": 2}) == [
        "runtime.transport: was 'sequential', now 'batched'", "runtime.batch_clients: was 4, now 2"]
    assert math_lever_changes(seq, {**seq, "device": "cuda"}) == ["runtime.device: was 'cpu', now 'cuda'"]
    assert math_lever_changes(seq, {**seq, "batch_clients": 8}) == []  # read by the batched transport only


def test_a_resume_on_the_batched_transport_warns_that_the_math_changes(tmp_path):
    import json

    over = {"train.steps": 1, "runtime.threads": 1}
    LocalRuntime(from_dict(tiny_config(tmp_path, rounds=1, **over), "<test>"), tmp_path / "run").run()
    raw = tiny_config(tmp_path, rounds=2, **{**over, "runtime.transport": "batched"})
    LocalRuntime(from_dict(raw, "<test>"), tmp_path / "run", resume=True).run()
    warnings = json.loads((tmp_path / "run" / "summary.json").read_text())["warnings"]
    assert warnings == ["--resume: runtime.transport: was 'sequential', now 'batched': the float math changes from the "
                        "resumed round on, so the result will not be bit-identical to an uninterrupted run"]


def test_a_checkpoint_records_the_device_auto_resolved_to_and_a_resume_elsewhere_is_told(tmp_path):
    # device auto on this CPU machine resolves to cpu; the checkpoint keeps "cpu", so a
    # resume where auto resolves to cuda (here: the recorded device edited to cuda, as a
    # GPU machine's checkpoint) warns, naming both devices
    import json

    over = {"train.steps": 1, "runtime.threads": 1, "runtime.device": "auto"}
    LocalRuntime(from_dict(tiny_config(tmp_path, rounds=1, **over), "<test>"), tmp_path / "run").run()
    [path] = (tmp_path / "run" / "checkpoints").rglob("checkpoint.json")
    body = json.loads(path.read_text())
    assert body["runtime"]["device"] == "cpu"
    body["runtime"]["device"] = "cuda"
    path.write_text(json.dumps(body))
    LocalRuntime(from_dict(tiny_config(tmp_path, rounds=2, **over), "<test>"), tmp_path / "run", resume=True).run()
    warnings = json.loads((tmp_path / "run" / "summary.json").read_text())["warnings"]
    assert warnings == ["--resume: runtime.device: was 'cuda', now 'cpu': the float math changes from the resumed round "
                        "on, so the result will not be bit-identical to an uninterrupted run"]


def test_a_device_recorded_as_auto_is_not_compared():
    from fedfm.runtime.checkpoint import math_lever_changes

    seq = {"transport": "sequential", "device": "auto", "batch_clients": 4, "batch_kernel": "auto"}
    assert math_lever_changes(seq, {**seq, "device": "cpu"}) == [] and math_lever_changes(seq, {**seq, "device": "cuda"}) == []
