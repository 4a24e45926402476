"""DiPrompT-inspired prompts: the dynamic query, the collaborative ensemble, per-domain
aggregation over contributors only, a client's update of its own domain prompts only, the
skip_zero codec, and the refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedfm.aggregators import aggregators
from fedfm.codecs import CodecChain, CodecContext
from fedfm.config import ConfigError, from_dict
from fedfm.core.types import Instruction, Update
from fedfm.learners import learners
from fedfm.peft.diprompt import assign_domains, ensemble, ensemble_weights, query_scores
from fedfm.personalize.diprompt import COUNTS, per_domain_delta
from fedfm.runtime import LocalRuntime
from fedfm.runtime.workbench import Workbench

from conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dynamic_query_by_hand():
    # M = 2 domain prompts, B = 2 inputs, C = 2 classes.
    logits = torch.tensor([
        [[2.0, 0.0], [0.0, 0.0]],  # domain 0 on inputs 0, 1
        [[0.0, 0.0], [0.0, 3.0]],  # domain 1
    ])
    # confidence = max softmax: (2, 0) -> 1 / (1 + e^-2) = 0.8808; (0, 0) -> 0.5; (0, 3) -> 0.9526
    scores = query_scores(logits)
    assert torch.allclose(scores, torch.tensor([[0.8808, 0.5], [0.5, 0.9526]]), atol=1e-4)
    assert assign_domains(scores).tolist() == [0, 1]
    # with labels (1, 1), the lowest loss: input 0: CE under domain 0 = log(1 + e^2) = 2.1269,
    # under domain 1 = log 2 = 0.6931 -> domain 1 (the confident domain 0 is wrong);
    # input 1: log 2 vs log(1 + e^-3) = 0.0486 -> domain 1
    scores = query_scores(logits, torch.tensor([1, 1]))
    assert torch.allclose(scores, -torch.tensor([[2.1269, 0.6931], [0.6931, 0.0486]]), atol=1e-4)
    assert assign_domains(scores).tolist() == [1, 1]
    assert assign_domains(torch.tensor([[0.5, 0.5, 0.1]])).tolist() == [0]  # ties: the lowest index


def test_ensemble_by_hand():
    g = torch.tensor([[0.0, 0.0]])  # p_G = (0.5, 0.5)
    d = torch.tensor([[[math.log(3), 0.0]], [[0.0, math.log(9)]]])  # p_0 = (0.75, 0.25), p_1 = (0.1, 0.9)
    # confidences (0.75, 0.9); T = 0.1: w = softmax(7.5, 9) = (1 / (1 + e^1.5), ...) = (0.18243, 0.81757)
    w = ensemble_weights(d, 0.1)
    assert torch.allclose(w, torch.tensor([[0.18243, 0.81757]]), atol=1e-5)
    # p_dom = 0.18243 (0.75, 0.25) + 0.81757 (0.1, 0.9) = (0.21858, 0.78142)
    # g = 0.5: p = 0.5 (0.5, 0.5) + 0.5 p_dom = (0.35929, 0.64071); the forward returns log p
    out = ensemble(g, d, 0.5, 0.1)
    assert torch.allclose(out.exp(), torch.tensor([[0.35929, 0.64071]]), atol=1e-5)
    # g = 1: the global prompt alone; g = 0 with T -> 0: the most confident domain prompt alone
    assert torch.allclose(ensemble(g, d, 1.0, 0.1).exp(), torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(ensemble(g, d, 0.0, 1e-4).exp(), torch.tensor([[0.1, 0.9]]), atol=1e-6)


def _update(cid, n, counts, deltas):
    names = ["classifier.weight", "diprompt.global_prompt", "diprompt.domains.0", "diprompt.domains.1", "diprompt.domains.2"]
    return Update(cid=cid, payload={k: torch.tensor([v]) for k, v in zip(names, deltas)}, num_examples=n, meta={COUNTS: json.dumps(counts)})


def test_per_domain_aggregation_counts_only_contributors():
    model = {n: torch.zeros(1) for n in _update(0, 1, [1], [0] * 5).payload}
    ups = [  # (client, examples, inputs trained under domains 0, 1, 2; deltas of head, global, domains 0, 1, 2)
        _update(0, 8, [8, 0, 0], [1.0, 1.0, 1.0, 0.0, 0.0]),
        _update(1, 8, [2, 6, 0], [3.0, 3.0, 3.0, -2.0, 0.0]),
        _update(2, 4, [0, 4, 0], [-1.0, -1.0, 0.0, 4.0, 0.0]),
    ]
    rule = aggregators.get("fedavg").obj
    params = aggregators.parse("fedavg", {}, "aggregator")
    delta, contributors = per_domain_delta(model, ups, rule, params)
    # global prompt and head: every client, by examples: (8 * 1 + 8 * 3 + 4 * (-1)) / 20 = 1.4
    assert delta["diprompt.global_prompt"].item() == pytest.approx(1.4)
    assert delta["classifier.weight"].item() == pytest.approx(1.4)
    # domain 0: clients 0 (8 inputs) and 1 (2): (8 * 1 + 2 * 3) / 10 = 1.4; counting client 2's
    # zero would give 14 / 14 = 1.0, by examples (8 + 24 + 0) / 20 = 1.6
    assert delta["diprompt.domains.0"].item() == pytest.approx(1.4)
    # domain 1: clients 1 (6, -2) and 2 (4, 4): (-12 + 16) / 10 = 0.4 (not 4 / 18 with client 0)
    assert delta["diprompt.domains.1"].item() == pytest.approx(0.4)
    assert delta["diprompt.domains.2"].item() == 0.0  # nobody trained it
    assert contributors == [2, 2, 0]
    # the moving average (beta 0.5) moves a domain prompt by half its mean, the global prompt fully
    delta, _ = per_domain_delta(model, ups, rule, params, momentum=0.5)
    assert delta["diprompt.domains.0"].item() == pytest.approx(0.7)
    assert delta["diprompt.global_prompt"].item() == pytest.approx(1.4)
    bad = Update(cid=5, payload=ups[0].payload, num_examples=8, meta={COUNTS: "[1, 2]"})
    with pytest.raises(ValueError, match=r"client 5 sent diprompt.counts \[1.0, 2.0\]; expected 3"):
        per_domain_delta(model, [bad], rule, params)


def _diprompt(tmp_path, assign="sample", **over):
    raw = tiny_config(tmp_path, **over)
    raw["peft"] = {"method": "diprompt", "num_virtual_tokens": 2, "num_domains": 3}
    raw["learner"] = {"name": "diprompt", "assign": assign}
    return raw


@pytest.mark.parametrize("assign", ["client", "sample"])
def test_client_update_leaves_untrained_domain_prompts_unchanged(tmp_path, assign):
    wb = Workbench(from_dict(_diprompt(tmp_path, assign, **{"train.steps": 3, "train.lr": 0.05})))
    state = wb.initial_state()
    domains = [f"diprompt.domains.{m}" for m in range(3)]
    assert set(domains) | {"diprompt.global_prompt"} <= set(state) and any(k.startswith("classifier.") for k in state)
    learner = learners.get("diprompt").obj(learners.parse("diprompt", {"assign": assign}, "learner"))
    update = learner.local_update(Instruction(round=1, cid=0, state=state), wb.context(0, 1))
    counts = json.loads(update.meta[COUNTS])
    assert sum(counts) == 3 * 8  # 3 steps of 8 inputs, each trained under one domain prompt
    if assign == "client":
        assert sorted(counts) == [0, 0, 24]  # one prompt for the whole round
    for m, name in enumerate(domains):
        moved = bool(update.payload[name].abs().sum() > 0)
        assert moved == (counts[m] > 0), (m, counts)  # exact zeros where no input was assigned
    assert update.payload["diprompt.global_prompt"].abs().sum() > 0


def test_skip_zero_codec_sends_only_moved_tensors():
    chain = CodecChain.from_specs([{"skip_zero": True}], "codecs.up")
    ref = {"a": torch.zeros(256), "b": torch.zeros(2)}
    payload = {"a": torch.zeros(256), "b": torch.tensor([1.0, -2.0])}
    ctx = CodecContext("up", 1, 0, ref)
    sent = chain.encode(payload, {"cid": "0"}, ctx)
    # 'a' (256 float32 = 1,024 bytes) does not travel
    assert sent.stage_bytes["input"] - sent.stage_bytes["skip_zero"] > 1000
    got, meta = chain.decode(sent.data, ctx)
    assert torch.equal(got["a"], torch.zeros(256)) and torch.equal(got["b"], payload["b"])
    assert meta == {"cid": "0"}


def test_run_end_to_end_with_skip_zero(tmp_path):
    raw = _diprompt(tmp_path, **{"train.steps": 2, "rounds": 2})
    raw["codecs"] = {"up": [{"skip_zero": True}]}
    out = tmp_path / "run"
    LocalRuntime(from_dict(raw), out).run()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == 2 and 0.0 <= rows[-1]["accuracy"] <= 1.0


def test_refusals(tmp_path):
    raw = _diprompt(tmp_path)
    raw["peft"] = {"method": "prompt_tuning"}
    with pytest.raises(ConfigError, match="learner diprompt needs peft.method diprompt"):
        from_dict(raw)
    raw = _diprompt(tmp_path)
    raw["learner"] = {"name": "local"}
    with pytest.raises(ConfigError, match="peft.method diprompt needs learner diprompt"):
        from_dict(raw)
    raw = _diprompt(tmp_path)
    raw["peft"]["num_domains"] = 0
    with pytest.raises(ConfigError, match="num_domains=0: DiPrompT needs at least 1 domain prompt"):
        from_dict(raw)
    raw = _diprompt(tmp_path)
    raw["peft"]["local"] = ["diprompt.domains.*"]
    with pytest.raises(ConfigError, match="shared by construction"):
        from_dict(raw)
