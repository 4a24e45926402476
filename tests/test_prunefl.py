"""PruneFL: the prefix rule, the masks, the server's combine and the pruned model, by hand."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from fedfm.aggregators.prunefl import PruneFLServer
from fedfm.config import ConfigError, from_dict
from fedfm.core.protocols import RoundContext
from fedfm.core.types import MODEL, ClientSpec
from fedfm.learners.prunefl import G2, GROUP, PruneFLParams
from fedfm.peft.pruning import magnitude_masks, pack_mask, prefix_length, prunable, select_kept, unpack_mask
from fedfm.runtime.local import run_local

T = torch.tensor
W, V, HEAD = "enc.w", "enc.v", "classifier.weight"


def test_the_prefix_maximises_risk_reduction_per_round_time():
    s = T([4.0, 1.0, 1.0])
    # c = 2, t = 1: 4/3 = 1.333 > 5/4 = 1.25 > 6/5: keep the best entry only
    assert prefix_length(s, 2.0, 1.0) == 1
    # c = 10, t = 1: 4/11 = 0.364 < 5/12 = 0.417 < 6/13 = 0.462: keep all three
    assert prefix_length(s, 10.0, 1.0) == 3
    # c = 3, t = 1: 4/4 = 5/5 = 6/6 = 1: the first maximum, one entry
    assert prefix_length(s, 3.0, 1.0) == 1


def test_select_kept_ranks_all_weights_together_ties_to_the_earlier_position():
    scores = {W: T([[1.0, 9.0], [2.0, 0.0]]), V: T([[9.0, 2.0]])}
    # sorted: 9 (w[0,1]), 9 (v[0,0]), 2 (w[1,0]), 2 (v[0,1]), 1, 0; c = 4, t = 1:
    # k=1: 9/5 = 1.8, k=2: 18/6 = 3, k=3: 20/7 = 2.857: the two nines
    kept = select_kept(scores, 4.0, 1.0)
    assert kept[W].tolist() == [[False, True], [False, False]] and kept[V].tolist() == [[True, False]]
    # c = 30: ... 20/33 = 0.606, 22/34 = 0.647, 23/35 = 0.657, 23/36 = 0.639: k = 5
    kept = select_kept(scores, 30.0, 1.0)
    assert int(kept[W].sum() + kept[V].sum()) == 5 and not kept[W][1, 1]  # the zero-gradient entry goes


def test_magnitude_masks_and_packed_bits():
    state = {W: T([[3.0, -1.0], [0.5, -4.0]]), HEAD: T([[1.0]]), "enc.b": T([1.0, 2.0])}
    assert prunable(state, ["*"]) == [W]  # 2-D only, never the classifier
    m = magnitude_masks(state, [W], 0.5)[W]
    assert m.tolist() == [[True, False], [False, True]]  # |3| and |-4|
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[0, 9]] = True
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == 2 and packed.tolist() == [1, 2]  # bit 0, then bit 9
    assert torch.equal(unpack_mask(packed, torch.zeros(2, 5)), mask.view(2, 5))


def _server(**over):
    return PruneFLServer(PruneFLParams(**{"fixed_s": 4.0, "per_value_s": 1.0, **over}), 2)


def test_combine_zeroes_pruned_entries_and_reconfigures_from_mean_squared_gradients():
    server = _server(initial_density=0.5)
    model = {W: T([[3.0, -1.0], [0.5, -4.0]]), "enc.b": T([1.0])}
    ss = {MODEL: model, **server.init(model)}  # keeps 3 and -4
    inst = server.instruction(1, ss, ClientSpec(0, []), 0)
    assert inst.config == {"importance": True} and set(inst.broadcast[GROUP]) == {W}
    every = PruneFLParams(reconfigure_every=2, reconfigure_until=4)
    assert [every.reconfigures(r) for r in range(1, 7)] == [False, True, False, True, False, False]
    assert set(server.client_payload_spec(inst, model)) == {W, "enc.b", G2 + W}
    ctx = RoundContext(0, 0, torch.Generator(), 2)
    junk = {W: T([[0.5, 0.25], [0.125, 0.5]]), "enc.b": T([2.0])}  # a lossy codec left 0.25, 0.125 at pruned entries
    # g^2 of two clients: mean [[0, 8], [0, 10]] (one -2 an attack made counts as 0): c = 4, t = 1
    # keeps 10 (10/5 = 2) and 8 (18/6 = 3), not more (18/7): w[0,1] is added, w[0,0] removed
    p1 = {G2 + W: T([[0.0, 6.0], [0.0, 12.0]])}
    p2 = {G2 + W: T([[-2.0, 10.0], [0.0, 8.0]])}
    groups, delta = server.combine(ss, [p1, p2], junk, ctx)
    new = unpack_mask(groups[GROUP][W], model[W])
    assert new.tolist() == [[False, True], [False, True]]
    assert ss[MODEL][W].tolist() == [[3.0, -0.0], [0.0, -4.0]]  # stored pruned from the start
    # kept before and after: the rule's delta; removed: -w (3 -> 0); never kept or added: -w = 0
    assert delta[W].tolist() == [[-3.0, 0.0], [0.0, 0.5]] and delta["enc.b"].tolist() == [2.0]
    after = {MODEL: {k: ss[MODEL][k] + delta[k] for k in model}, **groups}
    assert after[MODEL][W].tolist() == [[0.0, 0.0], [0.0, -3.5]]  # the added entry starts at zero
    assert server.report(after) == {"prunefl.density": 0.5, "prunefl.kept": 2}
    # the run's last round keeps the masks it trained: the saved model is the one trained
    last = RoundContext(3, 0, torch.Generator(), 2, rounds=3)
    assert server.combine(ss, [p1, p2], junk, last)[0] == {}
    # a round without squared gradients keeps the masks and still zeroes what a codec left
    groups, delta = server.combine(after, [{}], junk, ctx)
    assert groups == {} and delta[W].tolist() == [[-0.0, 0.25], [-0.0, 0.5]]


def test_model_view_is_the_state_times_its_masks():
    server = _server(initial_density=0.25)
    model = {W: T([[3.0, -1.0], [0.5, -4.0]]), "enc.b": T([1.0])}
    ss = {MODEL: model, **server.init(model)}
    view = server.model_view(ss)
    assert view[W].tolist() == [[0.0, -0.0], [0.0, -4.0]] and view["enc.b"].tolist() == [1.0]


def _raw(tmp_path, **over):
    learner = {"name": "prunefl", "prune": ["*encoder*"], "initial_density": 0.5, "fixed_s": 1.0, "per_value_s": 1e-4,
               "reconfigure_until": 2}
    return tiny_config(tmp_path, **{"peft": {"method": "full"}, "learner": learner, "rounds": 3, "train.epochs": 1, **over})


def test_a_run_trains_the_pruned_model_and_keeps_pruned_entries_exactly_zero(tmp_path):
    # 8-bit quantization up: a zero delta decodes to +-s/2, which the server must not let into pruned entries
    raw = _raw(tmp_path, **{"codecs.up": [{"quantize": 8}]})
    run_local(from_dict(raw, "<test>"), tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    final = load_file(str(tmp_path / "run" / "final.safetensors"))
    groups = load_file(str(tmp_path / "run" / "checkpoints" / "round-000003" / "algorithm.safetensors"))
    masks = {k.split("/", 1)[1]: unpack_mask(v, final[k.split("/", 1)[1]]) for k, v in groups.items() if k.startswith(GROUP + "/")}
    assert sorted(masks) == sorted(n for n, t in final.items() if "encoder" in n and t.dim() == 2)
    # rounds 1 and 2 reconfigure (until 2), round 3 trains on round 2's masks: the last two densities agree
    assert [("prunefl.density" in r) for r in rows] == [False, True, True, True]
    assert rows[1]["prunefl.density"] != rows[2]["prunefl.density"] == rows[3]["prunefl.density"] < 0.5
    assert rows[3]["prunefl.kept"] == sum(int(m.sum()) for m in masks.values())
    for n, m in masks.items():
        assert bool((final[n][~m] == 0).all()), n  # pruned: exactly zero
        if m.any():  # the ranking is global: a weight may lose every entry
            assert float((final[n][m] != 0).float().mean()) > 0.99, n  # kept: trained (an added entry starts at 0)
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]


def test_refused_with_the_field_named(tmp_path):
    with pytest.raises(ConfigError, match=r"server_optimizer must be \{name: sgd, lr: 1.0\} \(got fedadam"):
        from_dict(_raw(tmp_path, server_optimizer={"name": "fedadam"}), "<test>")
    with pytest.raises(ConfigError, match=r"peft.method must be full \(got lora\)"):
        from_dict(_raw(tmp_path, peft={"method": "lora", "r": 4, "alpha": 8, "target_modules": ["query"]}), "<test>")
    with pytest.raises(ConfigError, match=r"learner.reconfigure_until: 3 with rounds 3: round 3's squared gradients"):
        from_dict(_raw(tmp_path, **{"learner.reconfigure_until": 3}), "<test>")
    raw = _raw(tmp_path, **{"learner.prune": ["*nothing*"]})
    with pytest.raises(ValueError, match=r"learner.prune \['\*nothing\*'\] matches no 2-D weight"):
        run_local(from_dict(raw, "<test>"), tmp_path / "bad", progress=False)


def test_capacity_and_density_roles_are_refused_as_only_flash_reads_them(tmp_path):
    roles = [{"name": "fast", "count": 1, "profile": {"speed": 1.0}},  # sim_clock's key: accepted
             {"name": "small", "count": 1, "profile": {"capacity": 0.5, "density": 0.1}}]
    with pytest.raises(ConfigError) as err:
        from_dict(_raw(tmp_path, **{"federation.roles": roles}), "<test>")
    assert ("federation.roles 'small': profile capacity and density with learner prunefl, which ignores them: "
            "only FLASH (learner: flash) reads capacity and density for pruning") in str(err.value)
    assert "'fast'" not in str(err.value)
    from_dict(_raw(tmp_path, **{"federation.roles": roles[:1]}), "<test>")


def test_processes_transport_gives_the_same_run_with_faults_and_a_lossy_codec(tmp_path):
    from fedfm.runtime.local import LocalRuntime

    over = {"codecs.up": [{"topk": 0.5, "error_feedback": True}, {"quantize": 8}], "faults.dropout": 0.5,
            "federation.clients": 3, "runtime.threads": 1}
    seq = LocalRuntime(from_dict(_raw(tmp_path, **over)), tmp_path / "seq")
    seq.run()
    par = LocalRuntime(from_dict(_raw(tmp_path, **over, **{"runtime.transport": "processes", "runtime.workers": 2,
                                                           "runtime.threads_per_worker": 1})), tmp_path / "par")
    par.run()

    def rows(out):
        return [{k: v for k, v in json.loads(line).items() if k not in ("wall_s", "peak_rss_mb")}
                for line in open(out / "metrics.jsonl")]

    a, b = rows(tmp_path / "seq"), rows(tmp_path / "par")
    assert a == b and any(r.get("dropped") for r in a)  # every metrics field, a dropout included
    assert all(torch.equal(v, par.final_state[k]) for k, v in seq.final_state.items())
