"""Bad input and edge rounds of the zeroth-order and black-box features."""

from __future__ import annotations

import torch

from fedfm.aggregators.fedbpt import FedBPTServer
from fedfm.aggregators.zo_payload import WEIGHT
from fedfm.core.protocols import RoundContext
from fedfm.core.types import MODEL
from fedfm.learners.fedbpt import FedBPTParams


def _payload(mean, fitness):
    return {"mean": torch.tensor(mean, dtype=torch.float64), "fitness": torch.tensor([fitness], dtype=torch.float64),
            "sigma_sq": torch.tensor([2.0], dtype=torch.float64), WEIGHT: torch.tensor([1.0])}


def test_fedbpt_reports_how_many_means_the_server_es_was_told():
    # 3 sampled, 2 arrived (one dropped): fewer than the m = 3 parents, the distribution stays;
    # the round's row now says so (fedbpt.told 0, the clients' step size still sigma0 = 1.0)
    server = FedBPTServer(FedBPTParams(dim=2, popsize=4), 3)
    model = {"prompt_encoder.default.embedding.weight": torch.zeros(3, 2)}
    ss = {MODEL: model, **server.init(model)}
    two = [_payload([1.0, 0.0], 0.1), _payload([0.0, 1.0], 0.9)]
    groups, _ = server.combine(ss, two, {}, RoundContext(1, 0, torch.Generator(), 3, sample_size=3))
    assert server.report({**ss, **groups}) == {"fedbpt.told": 0, "fedbpt.sigma": 1.0}
    # 2 sampled, 2 arrived: told 2, and the step size moved off 1.0
    groups, _ = server.combine(ss, two, {}, RoundContext(1, 0, torch.Generator(), 2, sample_size=2))
    row = server.report({**ss, **groups})
    assert row["fedbpt.told"] == 2 and 0 < row["fedbpt.sigma"] < 1


def test_discrete_prompt_min_id_past_the_vocabulary_is_named():
    # min_id 40000 on a 30522-id vocabulary used to say "exceeds the -9478 vocabulary ids"
    import pytest

    from fedfm.peft.discrete_prompt import DiscretePromptParams, candidate_ids

    with pytest.raises(ValueError, match=r"peft.min_id=40000 leaves no candidate: it must be below the vocabulary size 30522"):
        candidate_ids(30522, DiscretePromptParams(candidates=10, min_id=40000))
    # 30522 - 30512 = 10 ids left: exactly 10 candidates fit, 11 do not
    assert candidate_ids(30522, DiscretePromptParams(candidates=10, min_id=30512)).tolist() == list(range(30512, 30522))
    with pytest.raises(ValueError, match=r"peft.candidates=11 exceeds the 10 vocabulary ids"):
        candidate_ids(30522, DiscretePromptParams(candidates=11, min_id=30512))
