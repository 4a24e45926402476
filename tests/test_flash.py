"""FLASH (SPDST): prune-and-regrow, the sparsity consensus, the discovery round, by hand."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from fedfm.config import ConfigError, from_dict
from fedfm.learners.flash import GROUP, update_steps
from fedfm.peft.pruning import consensus_densities, prune_and_regrow, random_masks, unpack_mask
from fedfm.runtime.local import run_local

T = torch.tensor


def test_prune_and_regrow_moves_density_to_where_the_gradient_is():
    w = {"a": T([[3.0, 1.0], [2.0, 4.0]]), "b": T([[0.0, 0.0]])}
    g = {"a": torch.zeros(2, 2), "b": T([[5.0, 0.1]])}
    m = {"a": torch.ones(2, 2, dtype=torch.bool), "b": torch.zeros(1, 2, dtype=torch.bool)}
    # a: int(0.5 * 4) = 2 smallest |w| pruned (1 and 2); b keeps nothing, prunes nothing;
    # 2 grown back over both: b's gradients 5 and 0.1 beat a's zeros
    assert prune_and_regrow(w, g, m, 0.5) == 2
    assert m["a"].tolist() == [[True, False], [False, True]] and m["b"].tolist() == [[True, True]]
    assert w["a"].tolist() == [[3.0, 0.0], [0.0, 4.0]]  # pruned weights set to zero


def test_consensus_scales_the_mean_layer_densities_to_the_target():
    full, half, none = torch.ones(4, dtype=torch.bool), T([True, True, False, False]), torch.zeros(2, dtype=torch.bool)
    masks = [{"a": half, "b": torch.ones(2, dtype=torch.bool)}, {"a": full, "b": none}]
    # mean densities a 0.75, b 0.5: 4 of 6 kept; target 0.5 -> 3 of 6: factor 0.75
    d = consensus_densities(masks, 0.5)
    assert d == {"a": 0.5625, "b": 0.375}
    assert consensus_densities(masks, 1.0) == {"a": 1.0, "b": 0.75}  # a capped at 1 (factor 1.5)
    drawn = random_masks({"a": torch.zeros(4), "b": torch.zeros(2)}, d, seed=3)
    assert int(drawn["a"].sum()) == 3 and int(drawn["b"].sum()) == 1  # ceil(2.25), ceil(0.75)
    assert all(torch.equal(drawn[k], v) for k, v in random_masks({"a": torch.zeros(4), "b": torch.zeros(2)}, d, 3).items())


def test_the_server_keeps_each_weights_consensus_share_of_its_largest_entries():
    from fedfm.aggregators.flash import SCHEDULE, FlashServer
    from fedfm.core.protocols import RoundContext
    from fedfm.core.types import MODEL, ClientSpec, Update
    from fedfm.learners.flash import FOUND, FlashParams
    from fedfm.peft.pruning import pack_mask

    server = FlashServer(FlashParams(density=0.5, pick="magnitude"), 2)
    model = {"enc.w": T([[3.0, -1.0], [0.5, -4.0]]), "enc.v": T([[1.0, 2.0]]), "classifier.weight": T([[1.0]])}
    ss = {MODEL: model, **server.init(model)}
    inst = server.instruction(1, ss, ClientSpec(0, []), 0)
    assert inst.config == {"discover": True, "regrow": False}
    assert set(server.client_payload_spec(inst, model)) == {FOUND + "enc.w", FOUND + "enc.v"}
    # no round has aggregated yet (round 1 skipped): round 2 discovers
    assert server.instruction(2, ss, ClientSpec(0, []), 0).config == {"discover": True, "regrow": False}
    found = [{"enc.w": T([[True, True], [False, False]]), "enc.v": T([[True, True]])},
             {"enc.w": torch.ones(2, 2, dtype=torch.bool), "enc.v": torch.zeros(1, 2, dtype=torch.bool)}]
    ups = [Update(i, {FOUND + n: pack_mask(m) for n, m in f.items()}, 5) for i, f in enumerate(found)]
    groups, delta = server.combine_updates(ss, ups, None, None, RoundContext(1, 0, torch.Generator(), 2))
    # densities w 0.5625 -> ceil(2.25) = 3 entries: |3|, |-4|, |-1|; v 0.375 -> 1 entry: |2|
    new = {n: unpack_mask(b, model[n]) for n, b in groups[GROUP].items()}
    assert new["enc.w"].tolist() == [[True, True], [False, True]] and new["enc.v"].tolist() == [[False, True]]
    # no weight moves; the entries the fixed masks prune go to zero (-w)
    assert delta["enc.w"].tolist() == [[0.0, 0.0], [-0.5, 0.0]] and delta["enc.v"].tolist() == [[-1.0, 0.0]]
    assert delta["classifier.weight"].tolist() == [[0.0]]
    assert groups[SCHEDULE]["discovered"].tolist() == [1]  # after round 1's aggregation, round 2 trains
    assert server.instruction(2, {**ss, **groups}, ClientSpec(0, []), 0).config == {"discover": False, "regrow": False}


def test_jmwst_repicks_each_weights_share_from_the_aggregate():
    from fedfm.aggregators.fedavg import fedavg
    from fedfm.aggregators.flash import FlashServer
    from fedfm.core.protocols import RoundContext
    from fedfm.core.types import MODEL, ClientSpec, Update
    from fedfm.learners.flash import FOUND, FlashParams
    from fedfm.peft.pruning import pack_mask

    server = FlashServer(FlashParams(density=0.5, variant="jmwst", update_every=2), 2)
    assert [server.regrows(r) for r in range(1, 7)] == [False, False, True, False, True, False]  # training rounds 2, 4
    assert not FlashServer(FlashParams(), 2).regrows(3)  # spdst: never
    model = {"enc.w": T([[3.0, -1.0], [0.5, -4.0]]), "enc.v": T([[1.0, 2.0]])}
    ss = {MODEL: model, GROUP: {n: pack_mask(torch.ones_like(t, dtype=torch.bool)) for n, t in model.items()}}
    inst = server.instruction(3, ss, ClientSpec(0, []), 0)
    assert inst.config == {"discover": False, "regrow": True}
    assert set(server.client_payload_spec(inst, model)) == {"enc.w", "enc.v", FOUND + "enc.w", FOUND + "enc.v"}
    found = [{"enc.w": T([[True, True], [False, False]]), "enc.v": T([[True, True]])},
             {"enc.w": torch.ones(2, 2, dtype=torch.bool), "enc.v": torch.zeros(1, 2, dtype=torch.bool)}]
    deltas = [{"enc.w": T([[0.0, 0.0], [4.0, 0.0]]), "enc.v": torch.zeros(1, 2)}, {"enc.w": torch.zeros(2, 2), "enc.v": torch.zeros(1, 2)}]
    ups = [Update(i, {**deltas[i], **{FOUND + n: pack_mask(m) for n, m in f.items()}}, 1) for i, f in enumerate(found)]
    groups, delta = server.combine_updates(ss, ups, fedavg, None, RoundContext(3, 0, torch.Generator(), 2))
    # aggregate w [[3, -1], [2.5, -4]]: its 3 (ceil 2.25) largest |w| are kept; v [[1, 2]]: 1 entry, the 2
    new = {n: unpack_mask(b, model[n]) for n, b in groups[GROUP].items()}
    assert new["enc.w"].tolist() == [[True, False], [True, True]] and new["enc.v"].tolist() == [[False, True]]
    assert delta["enc.w"].tolist() == [[0.0, 1.0], [2.0, 0.0]] and delta["enc.v"].tolist() == [[-1.0, 0.0]]


def test_update_steps_are_evenly_spaced():
    assert update_steps(16, 1) == {8} and update_steps(10, 3) == {2, 5, 7}


def _raw(tmp_path, **over):
    learner = {"name": "flash", "prune": ["*encoder*"], "density": 0.2}
    return tiny_config(tmp_path, **{"peft": {"method": "full"}, "learner": learner, "rounds": 3, "train.epochs": 1, **over})


def test_discovery_round_sends_masks_only_then_one_fixed_mask_is_trained(tmp_path):
    run_local(from_dict(_raw(tmp_path, **{"codecs.up": [{"quantize": 8}]}), "<test>"), tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    final = load_file(str(tmp_path / "run" / "final.safetensors"))
    groups = load_file(str(tmp_path / "run" / "checkpoints" / "round-000003" / "algorithm.safetensors"))
    masks = {k.split("/", 1)[1]: unpack_mask(v, final[k.split("/", 1)[1]]) for k, v in groups.items() if k.startswith(GROUP + "/")}
    # 2 layers x (4 x 32x32 + 2 x 32x64) = 16,384 prunable entries; one bit each, 2,048 bytes, per client
    assert sum(m.numel() for m in masks.values()) == 16384
    assert 2048 * 2 < rows[1]["bytes_up"] < rows[2]["bytes_up"] / 100  # masks (+ headers), not weights
    assert rows[1]["flash.density"] == rows[2]["flash.density"] == rows[3]["flash.density"]
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == rows[3]["flash.kept"] and 0 <= kept - 0.2 * 16384 < 12  # ceil per weight: <= 1 more each
    assert len({round(float(m.float().mean()), 3) for m in masks.values()}) > 1  # layers keep different shares
    for n, m in masks.items():
        assert bool((final[n][~m] == 0).all()), n
    assert rows[-1]["accuracy"] > rows[1]["accuracy"] == rows[0]["accuracy"]  # the discovery round trains nothing kept


def test_flash_needs_a_round_after_discovery(tmp_path):
    with pytest.raises(ConfigError, match=r"learner flash: rounds 1: round 1 is the discovery round"):
        from_dict(_raw(tmp_path, rounds=1), "<test>")


def test_jmwst_run_keeps_the_target_density_with_pruned_entries_zero(tmp_path):
    raw = _raw(tmp_path, rounds=4, **{"learner.variant": "jmwst", "learner.pick": "magnitude"})
    run_local(from_dict(raw, "<test>"), tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    final = load_file(str(tmp_path / "run" / "final.safetensors"))
    groups = load_file(str(tmp_path / "run" / "checkpoints" / "round-000004" / "algorithm.safetensors"))
    masks = {k.split("/", 1)[1]: unpack_mask(v, final[k.split("/", 1)[1]]) for k, v in groups.items() if k.startswith(GROUP + "/")}
    for r in rows[2:]:  # every training round re-picks: the consensus share of 16,384 entries, ceil per weight
        assert 0 <= r["flash.kept"] - 0.2 * 16384 < 12
    assert rows[2]["bytes_up"] > rows[1]["bytes_up"] * 10  # deltas and masks after the discovery round's masks
    for n, m in masks.items():
        assert bool((final[n][~m] == 0).all()), n
    assert rows[-1]["accuracy"] > rows[1]["accuracy"]


@pytest.mark.parametrize("learner", ["flash", "prunefl"])
def test_pruning_learners_need_full_and_plain_fedavg(tmp_path, learner):
    raw = _raw(tmp_path, learner={"name": learner, "prune": ["*encoder*"]}, server_optimizer={"name": "fedavgm"})
    with pytest.raises(ConfigError, match=rf"learner {learner}: server_optimizer must be \{{name: sgd, lr: 1.0\}} \(got fedavgm"):
        from_dict(raw, "<test>")
    # the squared gradients (PruneFL) and discovered masks (FLASH) would travel outside clipping and noise
    raw = _raw(tmp_path, learner={"name": learner, "prune": ["*encoder*"]},
               server_steps=[{"name": "dp_clip", "clip_norm": 0.5}, {"name": "dp_noise", "noise_multiplier": 1.0}])
    with pytest.raises(ConfigError, match=rf"learner.name: {learner}'s server half combines extra client tensors outside the DP"):
        from_dict(raw, "<test>")
    raw = _raw(tmp_path, learner={"name": learner, "prune": ["*encoder*"]}, exchanges=[{"name": "secagg", "bound": 1.0}])
    with pytest.raises(ConfigError, match=rf"learner.name: {learner}'s server half combines individual client tensors"):
        from_dict(raw, "<test>")


def test_flower_simulation_gives_the_same_run_with_faults_and_a_lossy_codec(tmp_path):
    """The discovery round's mask payloads and the masked rounds, through Flower's simulation:
    every metrics field but wall times, and the final State, as the local run's."""
    from fedfm.runtime.flower.simulation import run_flower_simulation
    from fedfm.runtime.local import LocalRuntime

    over = {"codecs.up": [{"quantize": 8}], "faults.dropout": 0.5, "federation.clients": 3}
    flower = from_dict(_raw(tmp_path, **over, runtime={"progress": False, "threads": 1, "backend": "flower",
                                                       "flower": {"num_cpus": 2}}))
    run_flower_simulation(flower, tmp_path / "flower")
    LocalRuntime(from_dict(_raw(tmp_path, **over, runtime={"progress": False, "threads": 1})), tmp_path / "local").run()

    def rows(out):
        return [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in open(out / "metrics.jsonl")]

    a, b = rows(tmp_path / "flower"), rows(tmp_path / "local")
    assert a == b and any(r.get("dropped") for r in b)
    fa, fb = load_file(str(tmp_path / "flower" / "final.safetensors")), load_file(str(tmp_path / "local" / "final.safetensors"))
    assert set(fa) == set(fb) and all(torch.equal(fa[k], fb[k]) for k in fa)
