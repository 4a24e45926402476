"""FedAPT (multi-domain adaptive prompts): key weights, keyed prompts, the selection of a
domain's key, the client's domain loss, and the by_domain partitioner."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedfm.config import ConfigError, from_dict
from fedfm.core.types import Instruction
from fedfm.data.domains import ByDomainParams, by_domain
from fedfm.learners import learners
from fedfm.peft.fedapt import FedAPTModule, key_weights, keyed_prompt
from fedfm.runtime.workbench import Workbench

from conftest import tiny_config


def test_key_weights_by_hand():
    # scores (1, 2, 3): mean 2, unbiased variance (1 + 0 + 1) / 2 = 1 -> z = (-1, 0, 1);
    # softmax(z / 1) = (e^-1, 1, e) / (e^-1 + 1 + e) = (0.0900, 0.2447, 0.6652)
    w = key_weights(torch.tensor([[1.0, 2.0, 3.0]]), 1.0)
    assert torch.allclose(w, torch.tensor([[0.0900, 0.2447, 0.6652]]), atol=1e-4)
    # the paper's temperature 0.01: z / 0.01 = (-100, 0, 100): one-hot on the largest score
    assert torch.allclose(key_weights(torch.tensor([[1.0, 2.0, 3.0]]), 0.01), torch.tensor([[0.0, 0.0, 1.0]]))
    # two keys, scores (0, 4): mean 2, variance (4 + 4) / 1 = 8 -> z = (-1/sqrt 2, 1/sqrt 2);
    # softmax at T = 1: 1 / (1 + e^sqrt 2) = 0.1956, 0.8044 (any two scores give z = -+0.7071)
    w = key_weights(torch.tensor([[0.0, 4.0], [5.0, 4.9]]), 1.0)
    s = 1 / (1 + math.exp(math.sqrt(2)))
    assert torch.allclose(w, torch.tensor([[s, 1 - s], [1 - s, s]]), atol=1e-6)
    assert torch.equal(key_weights(torch.tensor([[7.0]]), 0.01), torch.tensor([[1.0]]))  # one key: weight 1


def test_keyed_prompt_by_hand():
    prompt = torch.tensor([[1.0, 2.0]])  # P = 1, H = 2
    keys = torch.tensor([[[0.5, 0.0]], [[1.0, 1.0]]])  # K = 2
    w = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    # row 0: key_0 = (0.5, 0) -> (1 * 1.5, 2 * 1) = (1.5, 2)
    # row 1: 0.25 (0.5, 0) + 0.75 (1, 1) = (0.875, 0.75) -> (1 * 1.875, 2 * 1.75) = (1.875, 3.5)
    out = keyed_prompt(prompt, keys, w)
    assert torch.allclose(out, torch.tensor([[[1.5, 2.0]], [[1.875, 3.5]]]))


def test_adaptive_network_selects_the_domain_key():
    # H = 2, K = 2, query = identity: an input's feature (3, 1) scores (3, 1) -> z = (+0.707, -0.707)
    # -> weights (1, 0) at T = 0.01: key 0; the feature (0, 2) picks key 1.
    keys = torch.tensor([[[0.5, 0.0]], [[1.0, 1.0]]])
    m = FedAPTModule(torch.tensor([[1.0, 2.0]]), keys, 0.01)
    with torch.no_grad():
        m.query.weight.copy_(torch.eye(2))
    out = m.prompts(torch.tensor([[3.0, 1.0], [0.0, 2.0]]))
    assert torch.allclose(out, torch.tensor([[[1.5, 2.0]], [[2.0, 4.0]]]))
    assert torch.allclose(m.last_scores, torch.tensor([[3.0, 1.0], [0.0, 2.0]]))
    # while a client of domain 1 trains, its own key is used whatever the scores
    m.domain = 1
    assert torch.allclose(m.prompts(torch.tensor([[3.0, 1.0]])), torch.tensor([[[2.0, 4.0]]]))


def _fedapt(tmp_path, **over):
    raw = tiny_config(tmp_path, **over)
    raw["peft"] = {"method": "fedapt", "num_virtual_tokens": 2, "num_domains": 2}
    raw["learner"] = {"name": "fedapt"}
    raw["federation"]["roles"] = [
        {"name": "d0", "cids": [0], "profile": {"domain": 0}},
        {"name": "d1", "cids": [1], "profile": {"domain": 1}},
    ]
    return raw


def test_client_training_moves_the_adaptive_network_to_its_domain(tmp_path):
    wb = Workbench(from_dict(_fedapt(tmp_path, **{"train.steps": 6, "train.lr": 0.05})))
    state = wb.initial_state()
    # the keys are frozen buffers: never in the State; prompt, adaptive network and head are
    assert not any("keys" in k for k in state)
    assert {"fedapt.prompt", "fedapt.query.weight"} <= set(state) and any(k.startswith("classifier.") for k in state)
    learner = learners.get("fedapt").obj(learners.parse("fedapt", {}, "learner"))
    ctx = wb.context(1, 1)
    batch = wb.task.collate(ctx.examples[:8], wb.tokenizer)

    def p_domain1(st):
        wb.evaluate(st)  # sets the State
        with torch.no_grad():
            wb.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return float(torch.softmax(wb.model.fedapt.last_scores, -1)[:, 1].mean())

    before = p_domain1(state)
    update = learner.local_update(Instruction(round=1, cid=1, state=state), ctx)
    after = p_domain1({k: state[k] + update.payload[k] for k in state})
    assert after > before + 0.05, (before, after)
    assert wb.model.fedapt.domain is None  # reset after training: the global model mixes keys


def test_missing_domain_is_refused(tmp_path):
    raw = _fedapt(tmp_path)
    raw["federation"]["roles"] = [{"name": "d0", "cids": [0, 1], "profile": {"domain": 2}}]
    with pytest.raises(ConfigError, match=r"role 'd0' has profile.domain 2, not an integer in 0..1"):
        from_dict(raw)
    raw = _fedapt(tmp_path)
    raw["peft"] = {"method": "prompt_tuning"}
    with pytest.raises(ConfigError, match="learner fedapt needs peft.method fedapt"):
        from_dict(raw)
    wb = Workbench(from_dict(_fedapt(tmp_path)))
    wb.clients[0].profile.pop("domain", None)
    learner = learners.get("fedapt").obj(learners.parse("fedapt", {}, "learner"))
    with pytest.raises(ValueError, match="client 0 needs profile.domain"):
        learner.local_update(Instruction(round=1, cid=0, state=wb.initial_state()), wb.context(0, 1))


def test_by_domain_partitioner():
    groups = np.array(["a:x", "a:x", "a:x", "b:z", "a:y", "b:w", "b:w", "a:q"])
    parts = by_domain(None, groups, 4, np.random.default_rng(0), ByDomainParams())
    # domains sorted (a, b): clients 0 and 2 hold a, 1 and 3 hold b; whole groups, largest first
    # a: x (3 rows) -> client 0, then y and q (1 each) -> client 2, client 2 -> ... sizes 3 and 2
    assert sorted(len(p) for p in (parts[0], parts[2])) == [2, 3]
    assert all(groups[i].startswith("a:") for i in np.concatenate([parts[0], parts[2]]))
    assert all(groups[i].startswith("b:") for i in np.concatenate([parts[1], parts[3]]))
    assert sorted(np.concatenate(parts).tolist()) == list(range(8))
    with pytest.raises(ValueError, match="fewer than the 2 domains"):
        by_domain(None, groups, 1, np.random.default_rng(0), ByDomainParams())


def test_politics_source_chunks_and_domains():
    from fedfm.data.politics import PoliticsOptions, chunks, politics

    # 9 words in passages of 4: (a b c d) (e f g h) (i); the last (1 word < 4 // 2) joins the previous
    assert chunks("a b c d e f g h i", 4) == ["a b c d", "e f g h i"]
    assert chunks("a b c d e f", 4) == ["a b c d", "e f"]  # 2 words = 4 // 2: a passage of its own
    frame = politics(None, PoliticsOptions())
    assert set(frame["label"]) == {0, 1} and frame.attrs["label_names"] == ["democrat", "republican"]
    assert set(frame["domain"]) == {"convention_2012", "debates_2016"}
    assert all(g.split(":", 1)[0] == d for g, d in zip(frame["group"], frame["domain"]))
    # 180 named convention speakers + 3 unnamed speeches (a group each); the debates' four
    # candidates make a group per 10 consecutive statements in a debate: 60 groups
    assert frame[frame.domain == "convention_2012"]["group"].nunique() == 183
    assert frame[frame.domain == "debates_2016"]["group"].nunique() == 60
