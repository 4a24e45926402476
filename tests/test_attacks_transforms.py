"""Every attack's transformation on hand-built inputs: untargeted model poisoning, label
flipping, the backdoor trigger, ALIE and IPM (omniscient, on the server), and ASR."""

from __future__ import annotations

from statistics import NormalDist
from types import SimpleNamespace

import pytest
import torch

from fedfm.attacks.backdoor import Backdoor, BackdoorParams, attack_success_rate, insert_trigger, poison, triggered_test_set
from fedfm.attacks.label_flip import flip_labels
from fedfm.attacks.omniscient import Alie, AlieParams, Ipm, IpmParams, alie_z
from fedfm.attacks.untargeted import GaussianNoise, GaussianNoiseParams, Scaling, ScalingParams, SignFlip, SignFlipParams
from fedfm.config import from_dict
from fedfm.core.protocols import RoundContext
from fedfm.core.types import ClientSpec, Update
from fedfm.runtime import Workbench


def upd(v, cid=0):
    return Update(cid=cid, payload={"w": torch.tensor(v)}, num_examples=5)


def test_sign_flip_scaling_noise():
    ctx = SimpleNamespace(seed=7, cid=0)
    assert torch.equal(SignFlip(SignFlipParams()).after_train(upd([1.0, -2.0]), ctx).payload["w"], torch.tensor([-1.0, 2.0]))
    assert torch.equal(SignFlip(SignFlipParams(scale=2)).after_train(upd([1.0, -2.0]), ctx).payload["w"], torch.tensor([-2.0, 4.0]))
    assert torch.equal(Scaling(ScalingParams(factor=10)).after_train(upd([1.0, -2.0]), ctx).payload["w"], torch.tensor([10.0, -20.0]))
    # std 0: every coordinate is the mean
    out = GaussianNoise(GaussianNoiseParams(mean=5.0, std=0.0)).after_train(upd([1.0, -2.0]), ctx)
    assert torch.equal(out.payload["w"], torch.tensor([5.0, 5.0]))
    big = upd([0.0] * 20000)
    a = GaussianNoise(GaussianNoiseParams(std=1.0)).after_train(big, ctx).payload["w"]
    b = GaussianNoise(GaussianNoiseParams(std=1.0)).after_train(big, ctx).payload["w"]
    assert torch.equal(a, b) and abs(float(a.std()) - 1.0) < 0.03  # seeded by the client's seed
    c = GaussianNoise(GaussianNoiseParams(std=1.0)).after_train(big, SimpleNamespace(seed=8, cid=0)).payload["w"]
    assert not torch.equal(a, c)


def test_label_flip():
    ex = [{"input_ids": [1], "label": y} for y in (0, 1, 1)]
    assert [e["label"] for e in flip_labels(ex, 2, None, 0)] == [1, 0, 0]
    ex3 = [{"input_ids": [1], "label": y} for y in (0, 1, 2)]
    assert [e["label"] for e in flip_labels(ex3, 3, None, 0)] == [2, 1, 0]
    assert [e["label"] for e in flip_labels(ex3, 3, 1, 0)] == [1, 1, 1]
    assert [e["label"] for e in ex3] == [0, 1, 2]  # the client's own examples are not mutated
    with pytest.raises(ValueError, match="client 3: label_flip needs examples with a 'label'"):
        flip_labels([{"input_ids": [1]}], 2, None, 3)


def test_backdoor_trigger_insertion():
    e = {"input_ids": [101, 5, 6, 102], "label": 0}
    assert insert_trigger(e, [7, 8], 1, 1) == {"input_ids": [101, 7, 8, 5, 6, 102], "label": 1}
    exs = [{"input_ids": [101, i, 102], "label": i % 2} for i in range(4)]
    p = BackdoorParams(poison_fraction=0.5, target=1)
    out = poison(exs, [7], p, seed=3)
    poisoned = [o for o in out if 7 in o["input_ids"]]
    assert len(poisoned) == 2 and all(o["label"] == 1 and o["input_ids"][1] == 7 for o in poisoned)
    assert out == poison(exs, [7], p, seed=3)  # seeded
    # the ASR test set: only examples whose label is not the target, triggered, labelled target
    ts = triggered_test_set(exs, [7], target=1)
    assert [t["input_ids"] for t in ts] == [[101, 7, 0, 102], [101, 7, 2, 102]] and {t["label"] for t in ts} == {1}


def test_backdoor_middleware_uses_the_tokenizer(tiny):
    wb = Workbench(from_dict(tiny))
    ids = wb.tokenizer("cf", add_special_tokens=False)["input_ids"]
    ctx = SimpleNamespace(seed=1, cid=0, tokenizer=wb.tokenizer)
    ex = wb.examples(0)[:4]
    out = Backdoor(BackdoorParams(poison_fraction=1.0, target=1)).before_train(ex, ctx)
    assert all(o["input_ids"][1 : 1 + len(ids)] == ids and o["label"] == 1 for o in out)
    # ASR by hand: a model that always says class 1 (head bias +100 for class 1) has ASR 1;
    # one that always says 0 has ASR 0.
    state = wb.initial_state()
    bias = next(k for k in state if k.endswith("classifier.modules_to_save.default.bias"))
    state[bias] = torch.tensor([0.0, 100.0])
    assert attack_success_rate(wb, state, "cf", 1) == 1.0
    state[bias] = torch.tensor([100.0, 0.0])
    assert attack_success_rate(wb, state, "cf", 1) == 0.0


def omni_ctx(roles):
    clients = [ClientSpec(cid=i, indices=[], profile={"role": r}) for i, r in enumerate(roles)]
    return RoundContext(1, 0, torch.Generator(), len(clients), clients)


def test_alie_by_hand():
    # honest 1, 2, 3; attackers 3 and 4: n = 5, f = 2, s = floor(5/2 + 1) - 2 = 1,
    # z = Phi^-1((5 - 1) / 5) = Phi^-1(0.8) = 0.841621; mu = 2, sigma = sqrt(2/3) = 0.816497
    # crafted = 2 - 0.841621 * 0.816497 = 1.312816
    assert alie_z(5, 2) == pytest.approx(NormalDist().inv_cdf(0.8)) == pytest.approx(0.841621, abs=1e-6)
    ups = [upd([1.0], 0), upd([2.0], 1), upd([3.0], 2), upd([50.0], 3), upd([-9.0], 4)]
    out, _, m = Alie(AlieParams())(ups, omni_ctx(["default"] * 3 + ["attacker"] * 2), {})
    assert [float(u.payload["w"]) for u in out[:3]] == [1.0, 2.0, 3.0]
    assert float(out[3].payload["w"]) == pytest.approx(1.312816, abs=1e-5) == float(out[4].payload["w"])
    assert m["attackers"] == 2
    assert m["skipped"] == 0
    # no attacker sampled this round: unchanged
    out, _, m = Alie(AlieParams())(ups[:3], omni_ctx(["default"] * 3 + ["attacker"] * 2), {})
    assert out == ups[:3] and m == {"attackers": 0, "skipped": 0}
    # only attackers sampled: no honest mean, left as is, and the round says so
    out, _, m = Alie(AlieParams())(ups[3:], omni_ctx(["default"] * 3 + ["attacker"] * 2), {})
    assert out == ups[3:] and m == {"attackers": 0, "skipped": 1}
    # the paper's example size: n = 50, f = 12 -> s = floor(26) - 12 = 14, z = Phi^-1(36/50) = 0.582842
    assert alie_z(50, 12) == pytest.approx(0.582842, abs=1e-6)


def test_alie_leaves_a_round_where_attackers_are_the_majority():
    # n = 3, f = 2: s = floor(3/2 + 1) - 2 = 0, (n - s) / n = 1, z_max infinite: the round
    # goes on unattacked and says so (likewise n = 5, f = 3 and n = 4, f = 3); never raises.
    assert alie_z(3, 2) is None and alie_z(5, 3) is None and alie_z(4, 3) is None
    assert alie_z(4, 2) == pytest.approx(NormalDist().inv_cdf(0.75))  # s = 1: defined
    ups = [upd([1.0], 0), upd([50.0], 1), upd([-9.0], 2)]
    out, _, m = Alie(AlieParams())(ups, omni_ctx(["default", "attacker", "attacker"]), {})
    assert [float(u.payload["w"]) for u in out] == [1.0, 50.0, -9.0]
    assert m == {"attackers": 0, "skipped": 1}
    # with z given, the same round is attacked: 1 - 2 * 0 = 1 (one honest update: sigma 0)
    out, _, m = Alie(AlieParams(z=2.0))(ups, omni_ctx(["default", "attacker", "attacker"]), {})
    assert [float(u.payload["w"]) for u in out] == [1.0, 1.0, 1.0] and m["skipped"] == 0
    with pytest.raises(ValueError, match="0 < f < n"):
        alie_z(3, 3)


def test_ipm_by_hand():
    # honest mean (1 + 2 + 3) / 3 = 2; epsilon 0.5 -> attackers send -1
    ups = [upd([1.0], 0), upd([2.0], 1), upd([3.0], 2), upd([50.0], 3)]
    out, _, m = Ipm(IpmParams(epsilon=0.5))(ups, omni_ctx(["default"] * 3 + ["evil"]), {})
    assert float(out[3].payload["w"]) == 50.0 and m["attackers"] == 0  # role 'attacker' by default
    out, _, m = Ipm(IpmParams(epsilon=0.5, role="evil"))(ups, omni_ctx(["default"] * 3 + ["evil"]), {})
    assert float(out[3].payload["w"]) == pytest.approx(-1.0) and m == {"attackers": 1, "skipped": 0}
    out, _, m = Ipm(IpmParams(role="evil"))(ups[3:], omni_ctx(["default"] * 3 + ["evil"]), {})  # no honest update
    assert out == ups[3:] and m == {"attackers": 0, "skipped": 1}
