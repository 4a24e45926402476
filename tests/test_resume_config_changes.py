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
