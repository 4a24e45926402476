"""Hetero-FLASH (per-client densities as nested sub-masks) and FLASH's cosine prune rate, by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from fedfm.aggregators.fedavg import fedavg
from fedfm.aggregators.flash import FlashServer
from fedfm.aggregators.nested_masks import client_share, holder_average, level_masks, nested_combine
from fedfm.config import ConfigError, from_dict
from fedfm.core.protocols import RoundContext
from fedfm.core.types import MODEL, ClientSpec, Update
from fedfm.learners.flash import GROUP, FlashParams, rate_at
from fedfm.peft.pruning import pack_mask, unpack_mask
from fedfm.runtime.local import run_local

T = torch.tensor


def test_cosine_prune_rate_at_flashs_middle_update():
    p = FlashParams(prune_rate=0.5)
    # 10 local steps, the one update after step 5 (0-based): 6 of 10 scheduler steps taken
    assert rate_at(p, 5, 10) == pytest.approx(0.5 * (1 + math.cos(0.6 * math.pi)) / 2) == pytest.approx(0.172746, abs=1e-6)
    assert rate_at(p, 9, 10) == pytest.approx(0.0, abs=1e-12)  # annealed to zero at the last step
    assert rate_at(FlashParams(prune_rate=0.5, prune_rate_decay="constant"), 5, 10) == 0.5


def test_client_share_from_profile_density_or_capacity():
    assert client_share({"density": 0.05}, 0.1, "client 3") == pytest.approx(0.5)
    assert client_share({"capacity": 0.75, "rank": 2}, 0.1, "client 3") == 0.75
    assert client_share({"speed": 0.5}, 0.1, "client 3") == 1.0
    with pytest.raises(ValueError, match=r"client 3: profile.density must be a number in \(0, learner.density = 0.1\], got 0.2"):
        client_share({"density": 0.2}, 0.1, "client 3")
    with pytest.raises(ValueError, match=r"client 4: profile.capacity must be a number in \(0, 1\], got 0"):
        client_share({"capacity": 0}, 0.1, "client 4")
    with pytest.raises(ValueError, match=r"client 4: profile gives both density and capacity"):
        client_share({"capacity": 0.5, "density": 0.05}, 0.1, "client 4")


def test_level_masks_keep_the_largest_entries_of_the_servers_mask_nested():
    model = {"w": T([[3.0, -1.0], [0.5, -4.0]])}
    mask = {"w": T([[True, True], [False, True]])}  # 3 kept
    half = level_masks(model, mask, 0.5)["w"]  # ceil(1.5) = 2: |-4| and |3|
    third = level_masks(model, mask, 0.3)["w"]  # ceil(0.9) = 1: |-4|
    assert half.tolist() == [[True, False], [False, True]] and third.tolist() == [[False, False], [False, True]]
    assert level_masks(model, mask, 1.0) is mask
    # 0.5 has the largest |w| of the model but is outside the server's mask: never picked
    assert not bool(level_masks(model, mask, 0.99)["w"][1, 0])


def test_nested_combine_averages_each_entry_over_its_holders():
    model = {"w": T([[4.0, 3.0, 1.0, 0.0]]), "classifier.weight": T([0.0])}
    server = {"w": T([[True, True, True, False]])}
    levels = {0.5: level_masks(model, server, 0.5), 1.0: server}  # 0.5: ceil(1.5) = 2 entries, the 4 and the 3
    ups = [Update(0, {"w": T([[1.0, 1.0, 0.0, 0.0]]), "classifier.weight": T([3.0])}, 1),   # f = 0.5
           Update(1, {"w": T([[3.0, 5.0, 2.0, 0.0]]), "classifier.weight": T([6.0])}, 1),   # f = 1
           Update(2, {"w": T([[0.0, 2.0, 5.0, 0.0]]), "classifier.weight": T([0.0])}, 2)]   # f = 1
    delta = nested_combine(model, ups, [0.5, 1.0, 1.0], levels.__getitem__, fedavg, None)
    # entries 0, 1 (every client, weights 1:1:2): (1+3+0)/4 = 1, (1+5+4)/4 = 2.5
    # entry 2 (clients 1 and 2, weights 1:2): (2 + 10)/3 = 4; entry 3 (in no mask): 0; head over all: 9/4
    assert delta["w"].tolist() == [[1.0, 2.5, 4.0, 0.0]] and delta["classifier.weight"].tolist() == [2.25]
    # no client at f = 1: entry 2 has no holder and does not move
    only = nested_combine(model, ups[:1], [0.5], levels.__getitem__, fedavg, None)
    assert only["w"].tolist() == [[1.0, 1.0, 0.0, 0.0]]


def test_the_server_sends_a_small_client_its_sub_mask_and_combines_by_holders():
    server = FlashServer(FlashParams(density=0.5), 2)
    model = {"enc.w": T([[3.0, -1.0], [0.0, -4.0]]), "classifier.weight": T([[1.0]])}
    ss = {MODEL: model, GROUP: {"enc.w": pack_mask(T([[True, True], [False, True]]))}}
    small, big = ClientSpec(0, [], profile={"capacity": 0.5}), ClientSpec(1, [])
    first = server.instruction(1, ss, small, 0)  # discovery: every client at the learner's density
    assert unpack_mask(first.broadcast[GROUP]["enc.w"], model["enc.w"]).sum() == 3
    inst = server.instruction(2, ss, small, 0)
    assert unpack_mask(inst.broadcast[GROUP]["enc.w"], model["enc.w"]).tolist() == [[True, False], [False, True]]
    assert inst.state["enc.w"].tolist() == [[3.0, 0.0], [0.0, -4.0]]  # what it does not train is not sent
    assert server.instruction(2, ss, big, 0).state["enc.w"] is model["enc.w"]
    ups = [Update(0, {"enc.w": T([[2.0, 0.0], [0.0, 2.0]]), "classifier.weight": T([[1.0]])}, 1),
           Update(1, {"enc.w": T([[4.0, 6.0], [0.0, 4.0]]), "classifier.weight": T([[3.0]])}, 1)]
    ctx = RoundContext(2, 0, torch.Generator(), 2, clients=[small, big])
    _, delta = server.combine_updates(ss, ups, fedavg, None, ctx)
    # the 3 and the -4: both clients (3, 3); the -1: the big client alone (6); the pruned 0 stays 0
    assert delta["enc.w"].tolist() == [[3.0, 6.0], [0.0, 3.0]] and delta["classifier.weight"].tolist() == [[2.0]]


def test_jmwst_averages_each_entry_over_the_clients_whose_final_mask_keeps_it():
    model = {"w": T([[2.0, 4.0, 0.0, 1.0]])}
    received = [{"w": T([[False, True, False, False]])}, {"w": T([[True, True, False, True]])}]  # a small, a full client
    held = [{"w": T([[False, False, True, False]])}, {"w": T([[True, True, False, False]])}]  # after pruning and regrowing
    # client 0 pruned the 4 (-4) and grew entry 2 to 3; client 1 trained 2 -> 3, 4 -> 6, pruned the 1 (-1)
    ups = [Update(0, {"w": T([[0.0, -4.0, 3.0, 0.0]])}, 1), Update(1, {"w": T([[1.0, 2.0, 0.0, -1.0]])}, 3)]
    delta = holder_average(model, ups, received, held)
    # entry 0: client 1 alone -> 3; entry 1: client 1 alone (client 0 dropped it) -> 6; entry 2: client 0 -> 3;
    # entry 3: nobody keeps it -> 0
    assert (model["w"] + delta["w"]).tolist() == [[3.0, 6.0, 3.0, 0.0]]
    # had both kept entries 0 and 1 (weights 1:3): client 0's values there are 0 (never received) and 0 (4 - 4)
    both = holder_average(model, ups, received, [held[1], held[1]])
    assert (model["w"] + both["w"]).tolist() == [[(0 + 3 * 3) / 4, (0 + 3 * 6) / 4, 0.0, 0.0]]


def _raw(tmp_path, roles, **over):
    learner = {"name": "flash", "prune": ["*encoder*"], "density": 0.2, **over.pop("learner", {})}
    return tiny_config(tmp_path, **{"peft": {"method": "full"}, "learner": learner, "rounds": 3, "train.epochs": 1,
                                    "federation.roles": roles, **over})


def test_bad_profiles_and_jmwst_are_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"federation.roles 'big': profile.density must be a number in \(0, learner.density = 0.2\]"):
        from_dict(_raw(tmp_path, [{"name": "big", "count": 1, "profile": {"density": 0.3}}]), "<test>")
    small = [{"name": "small", "count": 1, "profile": {"capacity": 0.5}}]
    with pytest.raises(ConfigError, match=r"roles \['small'\] train below learner.density .* jmwst: .* "
                                          r"aggregator.rule must be fedavg \(got median\)"):
        from_dict(_raw(tmp_path, small, learner={"variant": "jmwst"}, aggregator={"rule": "median"}), "<test>")
    from_dict(_raw(tmp_path, small, learner={"variant": "jmwst"}), "<test>")  # fedavg: accepted
    # settings that would be capped or ignored
    with pytest.raises(ConfigError, match=r"learner.updates: 5 with train.steps 4: .* set learner.updates to at most 4"):
        from_dict(_raw(tmp_path, [], learner={"updates": 5}, **{"train.steps": 4}), "<test>")
    from_dict(_raw(tmp_path, [], learner={"updates": 4}, **{"train.steps": 4}), "<test>")  # 4 distinct steps: 0, 1, 2, 3
    with pytest.raises(ConfigError, match=r"learner.update_every: 2 acts with variant jmwst only"):
        from_dict(_raw(tmp_path, [], learner={"update_every": 2}), "<test>")
    from_dict(_raw(tmp_path, [], learner={"update_every": 2, "variant": "jmwst"}), "<test>")


def test_hetero_jmwst_run_keeps_the_target_density_with_pruned_entries_zero(tmp_path):
    roles = [{"name": "small", "count": 1, "profile": {"capacity": 0.5}}]
    raw = _raw(tmp_path, roles, rounds=4, learner={"variant": "jmwst", "pick": "magnitude"})
    run_local(from_dict(raw, "<test>"), tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    final = load_file(str(tmp_path / "run" / "final.safetensors"))
    groups = load_file(str(tmp_path / "run" / "checkpoints" / "round-000004" / "algorithm.safetensors"))
    for r in rows[2:]:  # the consensus share of 16,384 entries at 0.2, ceil per weight
        assert 0 <= r["flash.kept"] - 0.2 * 16384 < 12
    for key, bits in groups.items():
        if not key.startswith(GROUP + "/"):  # the masks (flash.schedule holds the discovery round)
            continue
        name = key.split("/", 1)[1]
        assert bool((final[name][~unpack_mask(bits, final[name])] == 0).all()), name


def test_flower_simulation_gives_the_same_hetero_run_with_faults_and_a_lossy_codec(tmp_path):
    """Small and full clients through Flower's simulation and the local loop: equal on every
    metrics field but wall times, and on the final State, whose pruned entries are zero."""
    from fedfm.runtime.flower.simulation import run_flower_simulation
    from fedfm.runtime.local import LocalRuntime

    roles = [{"name": "small", "count": 2, "profile": {"capacity": 0.5}}]
    over = {"codecs.up": [{"quantize": 8}], "faults.dropout": 0.3, "federation.clients": 4}
    flower = from_dict(_raw(tmp_path, roles, **over, runtime={"progress": False, "threads": 1, "backend": "flower",
                                                              "flower": {"num_cpus": 2}}))
    run_flower_simulation(flower, tmp_path / "flower")
    LocalRuntime(from_dict(_raw(tmp_path, roles, **over, runtime={"progress": False, "threads": 1})), tmp_path / "local").run()

    def rows(out):
        return [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in open(out / "metrics.jsonl")]

    a, b = rows(tmp_path / "flower"), rows(tmp_path / "local")
    assert a == b and len(b) == 4
    fa, fb = load_file(str(tmp_path / "flower" / "final.safetensors")), load_file(str(tmp_path / "local" / "final.safetensors"))
    assert set(fa) == set(fb) and all(torch.equal(fa[k], fb[k]) for k in fa)
    groups = load_file(str(tmp_path / "local" / "checkpoints" / "round-000003" / "algorithm.safetensors"))
    for key, bits in groups.items():
        if not key.startswith(GROUP + "/"):  # the masks (flash.schedule holds the discovery round)
            continue
        name = key.split("/", 1)[1]
        assert bool((fb[name][~unpack_mask(bits, fb[name])] == 0).all()), name


def test_small_clients_send_fewer_non_zero_values(tmp_path):
    """With a codec that sends only the non-zero entries, each of 2 clients at half the
    density sends about 1,640 fewer values of the 3,281 kept entries (16,384 x 0.2): at 4
    to 8 bytes a value (bitmap or index form), 13 to 26 kB fewer in a round."""
    up = {"codecs.up": [{"threshold": 1.0e-30}], "peft": {"method": "full", "exclude": ["*embeddings*"]}}
    sent = {}
    for name, roles in (("full", []), ("half", [{"name": "small", "count": 2, "profile": {"capacity": 0.5}}])):
        run_local(from_dict(_raw(tmp_path, roles, **up), "<test>"), tmp_path / name, progress=False)
        sent[name] = [json.loads(line)["bytes_up"] for line in open(tmp_path / name / "metrics.jsonl")]
    assert sent["full"][1] == sent["half"][1]  # the discovery round: every client at the learner's density
    for rnd in (2, 3):
        assert 2 * 4 * 1600 < sent["full"][rnd] - sent["half"][rnd] < 2 * 8 * 1650
