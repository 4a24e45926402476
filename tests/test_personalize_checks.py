"""Config-time refusals of IFCA and DiPrompT with server steps and middleware that
change the payload, and the numbers behind them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fedfm.aggregators import aggregators
from fedfm.aggregators.clip import clip_payload
from fedfm.config import ConfigError, from_dict
from fedfm.core.types import Update
from fedfm.personalize.checks import PAYLOAD_KEEPING_STEPS, ifca_payload_problems
from fedfm.personalize.diprompt import COUNTS, per_domain_delta
from fedfm.personalize.ifca import WEIGHT

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "adaptability"


def example(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


def refusal(raw: dict) -> str:
    with pytest.raises(ConfigError) as err:
        from_dict(raw)
    return str(err.value)


def test_the_cluster_weight_counts_in_the_clip_norm():
    # What dp_clip / clip_updates would do to an IFCA payload: a delta of norm 0.1 plus the
    # weight [0, 200] has norm sqrt(0.1^2 + 200^2) = 200.000025; clipped to C = 0.5 the
    # whole payload is scaled by 0.5 / 200.000025 = 0.0025 = 1/400: the delta to 0.00025.
    payload = {"w": torch.tensor([0.06, 0.08]), WEIGHT: torch.tensor([0.0, 200.0])}
    clipped, _ = clip_payload(payload, 0.5)
    assert clipped["w"].tolist() == pytest.approx([0.06 / 400, 0.08 / 400], rel=1e-6)
    assert clipped[WEIGHT].tolist() == pytest.approx([0.0, 0.5], rel=1e-6)


def test_ifca_example_refuses_central_dp():
    raw = example("ifca.yaml")
    raw["server_steps"] += [{"name": "dp_clip", "clip_norm": 0.5}, {"name": "dp_noise", "noise_multiplier": 1.0}]
    msg = refusal(raw)
    assert "learner ifca: server_steps[1] 'dp_clip' (stage updates) rescales each update to a norm bound" in msg
    assert "'ifca/weight'" in msg and "scaled by 1/400" in msg
    assert "server_steps[2] 'dp_noise' (stage delta) works on the combined delta of cluster 0 only" in msg
    assert "central noise would reach cluster 0 only" in msg
    assert "server_steps[0] 'cluster_report'" not in msg  # it passes the updates on as they are


@pytest.mark.parametrize("step", [
    {"name": "clip_updates", "max_norm": 1.0},
    {"name": "norm_bound", "max_norm": 1.0},
    {"name": "centered_clip", "tau": 1.0},
    {"name": "weak_dp", "std": 0.01},
    {"name": "fedfa", "curvature": "identity"},
    {"name": "waffle", "key": "k"},
])
def test_ifca_refuses_steps_that_change_the_payload_or_see_cluster_0_only(step):
    raw = example("ifca.yaml")
    raw["server_steps"] = [step]
    assert f"learner ifca: server_steps[0] '{step['name']}'" in refusal(raw)


@pytest.mark.parametrize("attack", ["alie", "ipm"])
def test_ifca_refuses_the_omniscient_attacks(attack):
    raw = example("ifca.yaml")
    raw["attack"] = {"name": attack, "fraction": 0.25}
    msg = refusal(raw)
    assert f"server_steps[0] '{attack}' (stage updates) crafts every payload tensor" in msg
    assert "the crafted weight is not one positive entry" in msg


def test_ifca_refuses_payload_middleware_and_keeps_the_harmless_steps():
    raw = example("ifca.yaml")
    raw["attack"] = {"name": "sign_flip", "fraction": 0.25}
    assert "federation.roles[0].middleware[0] 'sign_flip' changes the payload tensors" in refusal(raw)
    raw = example("ifca.yaml")
    raw["attack"] = {"name": "label_flip", "fraction": 0.25}
    raw["server_steps"].append({"name": "sim_clock", "seconds_per_step": 0.1})
    assert from_dict(raw).learner.name == "ifca"  # label flipping acts on the examples, sim_clock on sizes
    assert set(PAYLOAD_KEEPING_STEPS) == {"cluster_report", "dp_sgd_accountant", "non_state_payload", "sim_clock"}
    assert ifca_payload_problems(from_dict(example("ifca.yaml"))) == []


def test_domain_prompt_sensitivity_exceeds_the_noise_scale():
    # n = 4 clipped, equally weighted updates (C = 0.5). Client 3 alone trained domain 1:
    # with it, domain 1's mean is its own 0.5; without it, 0 (nobody trained it). It moves
    # the aggregate by 0.5, four times the C / n = 0.125 the central noise is sized for.
    model = {"diprompt.global_prompt": torch.zeros(1), "diprompt.domains.0": torch.zeros(1), "diprompt.domains.1": torch.zeros(1)}

    def upd(cid, g, d0, d1, counts):
        payload = {"diprompt.global_prompt": torch.tensor([g]), "diprompt.domains.0": torch.tensor([d0]),
                   "diprompt.domains.1": torch.tensor([d1])}
        return Update(cid=cid, payload=payload, num_examples=1, meta={COUNTS: str(counts)})

    ups = [upd(0, 0.3, 0.4, 0.0, [8, 0]), upd(1, 0.3, 0.4, 0.0, [8, 0]), upd(2, 0.3, 0.4, 0.0, [8, 0]),
           upd(3, 0.0, 0.0, 0.5, [0, 8])]
    rule, params = aggregators.get("fedavg").obj, aggregators.parse("fedavg", {}, "aggregator")
    with_3, _ = per_domain_delta(model, ups, rule, params)
    without_3, _ = per_domain_delta(model, ups[:3], rule, params)
    assert with_3["diprompt.domains.1"].item() == pytest.approx(0.5)
    assert without_3["diprompt.domains.1"].item() == 0.0
    # the global prompt, averaged over every client, moves by (0.9 / 3) - (0.9 / 4) = 0.075 <= 0.125
    assert without_3["diprompt.global_prompt"].item() - with_3["diprompt.global_prompt"].item() == pytest.approx(0.075)


def test_diprompt_example_refuses_client_level_dp():
    raw = example("diprompt.yaml")
    raw["server_steps"] = [{"name": "dp_clip", "clip_norm": 0.5}, {"name": "dp_noise", "noise_multiplier": 1.0}]
    msg = refusal(raw)
    for i, name in enumerate(["dp_clip", "dp_noise"]):
        assert f"learner diprompt: server_steps[{i}] '{name}': the domain prompts are averaged with the clients' own input counts" in msg
    assert "not bounded by C / n" in msg
    raw = example("diprompt.yaml")
    raw["server_steps"] = [{"name": "dp_noise", "mode": "distributed", "noise_multiplier": 1.0}]
    raw["federation"]["roles"] = [{"name": "all", "cids": [0, 1, 2, 3], "middleware": [
        {"name": "dp_client_noise", "clip_norm": 0.5, "noise_multiplier": 1.0, "clients_per_round": 4}]}]
    msg = refusal(raw)
    assert "federation.roles[0].middleware[0] 'dp_client_noise'" in msg and "server_steps[0] 'dp_noise'" in msg
