"""docs/extending.md's worked plugin (examples/extending/signsgd.py): a learner with its
own payload (int8 signs) and its server half, loaded from the config's ``plugins``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedfm.config import ConfigError, from_dict, load_config
from fedfm.runtime import LocalRuntime

from conftest import tiny_config

PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "extending" / "signsgd.py"


def test_signsgd_plugin_sends_int8_signs_and_steps_by_the_vote(tmp_path):
    raw = tiny_config(tmp_path, rounds=1, **{"learner": {"name": "signsgd", "step": 0.5}})
    raw["plugins"] = [str(PLUGIN)]
    rt = LocalRuntime(from_dict(raw), tmp_path / "run")
    initial = rt.wb.initial_state()
    rt.run()
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    numel = sum(v.numel() for v in initial.values())
    # One byte per parameter plus the safetensors header (well under 1 KB here).
    per_client = row["bytes_up"] / len(row["clients"])
    assert numel < per_client < numel + 2048 and row["rejected"] == []
    for k, t in rt.final_state.items():  # every coordinate moved by exactly -0.5, 0 or +0.5
        moved = (t - initial[k]).abs()
        assert torch.all((moved == 0) | ((moved - 0.5).abs() < 1e-6)), k
    assert any(not torch.equal(t, initial[k]) for k, t in rt.final_state.items())


def test_example_config_loads_its_plugin_relative_to_itself():
    exp = load_config(PLUGIN.with_suffix(".yaml"))
    assert exp.learner.name == "signsgd" and exp.plugins == [str(PLUGIN)]


def test_a_missing_plugin_is_a_config_error(tmp_path):
    raw = tiny_config(tmp_path)
    raw["plugins"] = ["no_such_file.py"]
    with pytest.raises(ConfigError, match="no_such_file.py' not found"):
        from_dict(raw)


def test_a_server_part_lacking_members_is_named_when_built():
    from fedfm.aggregators import ServerPartBase, build_server_part, register_server_part, server_parts

    class Bare:  # a server half written without ServerPartBase: init/broadcast/payload_spec/combine only
        broadcast_groups = ()

        def __init__(self, params, num_clients):
            pass

        def init(self, model):
            return {}

        def broadcast(self, server_state):
            return {}

        def payload_spec(self, shared):
            return shared

        def combine(self, server_state, payloads, mean_delta, ctx):
            return {}, mean_delta

    register_server_part("bare_test_part", Bare)
    try:
        with pytest.raises(TypeError) as err:
            build_server_part("bare_test_part", None, 2)
        assert "learner 'bare_test_part' (Bare) lacks ['sends_state', 'phases', 'fewest_updates', 'instruction', 'client_reference', " \
               "'client_payload_spec', 'combine_updates', 'broadcast_reference', 'model_view', 'report', 'bind_model']" in str(err.value)
    finally:
        server_parts._entries.pop("bare_test_part")
    plain = build_server_part("local", None, 2)  # a learner with no server half: the base part's values
    assert type(plain) is ServerPartBase and plain.payload_spec({"w": 1}) == {"w": 1}
    assert plain.combine({}, [], {"w": 2}, None) == ({}, {"w": 2}) and plain.phases() == [] and plain.instruction is None
    assert plain.fewest_updates(5) == 1  # combines whatever the round keeps
