"""FedBPT: the client sees only an inference API; the server averages CMA-ES means and
step sizes (checked by hand) and moves the prompt along the fixed projection."""

from __future__ import annotations

import json

import pytest
import torch

from fedfm.aggregators.fedbpt import FedBPTServer, projection, prompt_name, prompt_of
from fedfm.aggregators.zo_payload import WEIGHT
from fedfm.config import from_dict
from fedfm.core.types import MODEL
from fedfm.learners.blackbox_api import make_inference_api
from fedfm.learners.fedbpt import FedBPTParams, search
from fedfm.learners.zo_core import cycle_batches
from fedfm.peft.state import get_state
from fedfm.runtime.local import LocalRuntime

from conftest import tiny_config


def fedbpt_raw(tmp_path, rounds=2):
    raw = tiny_config(tmp_path, rounds=rounds)
    raw["peft"] = {"method": "prompt_tuning", "num_virtual_tokens": 4}
    raw["learner"] = {"name": "fedbpt", "dim": 8, "generations": 2, "popsize": 4, "sigma0": 1.0}
    raw["server_steps"] = [{"name": "non_state_payload"}]
    return raw


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fedbpt")
    rt = LocalRuntime(from_dict(fedbpt_raw(tmp)), tmp / "out")
    rt.run()
    return rt


def test_the_api_exposes_no_parameter_and_no_gradient(run):
    wb = run.wb
    name = prompt_name(wb.template)
    api = make_inference_api(wb.model, wb.task, name)
    reachable = [getattr(api, a) for a in dir(api) if not a.startswith("__")]
    for value in reachable:
        assert not isinstance(value, (torch.nn.Module, torch.nn.Parameter))
        assert not (isinstance(value, torch.Tensor) and value.requires_grad)
    for attr in ("model", "parameters", "state_dict", "named_parameters", "prompt"):
        with pytest.raises(AttributeError):
            getattr(api, attr)
    with pytest.raises(AttributeError, match="read-only"):
        api.model = wb.model
    before = get_state(wb.model)
    batch = wb.task.collate(wb.examples(0)[:4], wb.tokenizer)
    logits = api.logits(torch.zeros(api.prompt_shape), batch)
    assert not logits.requires_grad and logits.shape == (4, 2)
    # the search sees only the API; afterwards every parameter is unchanged
    params = FedBPTParams(dim=4, generations=2, popsize=4)
    a = projection(int(torch.tensor(api.prompt_shape).prod()), 4, 0, 0.05)
    start = before[name]
    shift, sigma, metrics = search(api, cycle_batches(wb.context(0, 1), torch.Generator().manual_seed(0)), start, a, 1.0, params, 3)
    assert metrics["forward_passes"] == 8.0 and shift.shape == (4,) and sigma > 0
    after = get_state(wb.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="expected"):
        api.loss(torch.zeros(3), batch)


def test_server_averages_means_and_step_sizes_by_hand():
    # weights 1 and 3 -> 1/4, 3/4; means (relative) [1, 0] and [0, 2]; sigmas 0.5 and 1.0:
    #   shift = 1/4 [1, 0] + 3/4 [0, 2] = [0.25, 1.5];  sigma = 0.25*0.5 + 0.75*1.0 = 0.875
    params = FedBPTParams(dim=2, sigma0=1.0)
    server = FedBPTServer(params, 2)
    model = {"prompt_encoder.default.embedding.weight": torch.zeros(3, 2), "head": torch.ones(2)}
    ss = {MODEL: model, **server.init(model)}
    pay = [
        {"mean": torch.tensor([1.0, 0.0]), "sigma": torch.tensor([0.5]), WEIGHT: torch.tensor([1.0])},
        {"mean": torch.tensor([0.0, 2.0]), "sigma": torch.tensor([1.0]), WEIGHT: torch.tensor([3.0])},
    ]
    groups, delta = server.combine(ss, pay, {}, None)
    assert groups["fedbpt.dist"]["mean"].tolist() == [0.25, 1.5]
    assert groups["fedbpt.dist"]["sigma"].tolist() == [0.875]
    a = projection(6, 2, 0, params.projection_std)
    expected = (a @ torch.tensor([0.25, 1.5])).view(3, 2)
    assert torch.allclose(delta["prompt_encoder.default.embedding.weight"], expected, atol=1e-7)
    assert torch.equal(delta["head"], torch.zeros(2))
    # the mean and step size travel to clients as the broadcast group, not the State
    ss2 = {**ss, **groups}
    sent = server.broadcast(ss2)["fedbpt"]
    assert sorted(sent) == ["mean", "sigma"] and sent["sigma"].tolist() == [0.875]


def test_a_run_moves_only_the_prompt_along_the_projection(run):
    ss = run.loop.server_state
    name = prompt_name(ss[MODEL])
    dist = ss["fedbpt.dist"]
    assert bool((dist["mean"] != 0).any()) and float(dist["sigma"][0]) != 1.0
    p0 = run.wb.template[name]
    a = projection(p0.numel(), 8, 0, 0.05)
    assert torch.allclose(ss[MODEL][name], p0 + (a @ dist["mean"]).view_as(p0), atol=1e-5)
    for k, v in ss[MODEL].items():
        if k != name:
            assert torch.equal(v, run.wb.template[k])  # the head is never tuned


def test_downlink_is_the_mean_and_step_size_by_hand(run):
    # No State travels down: per client-round the broadcast is mean (d = 8 float32) and sigma
    # (1 float32): 36 B of data, 8 B of header length and this header JSON padded to 8:
    header = ('{"__metadata__":{"round":"1"},'
              '"fedbpt/mean":{"dtype":"F32","shape":[8],"data_offsets":[0,32]},'
              '"fedbpt/sigma":{"dtype":"F32","shape":[1],"data_offsets":[32,36]}}')
    size = 8 + len(header) + (-len(header)) % 8 + 36
    assert size == 8 + 160 + 36
    rows = [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines()]
    for r in rows[1:]:
        assert r["bytes_down"] == len(r["clients"]) * size == 2 * 204
    # the client's rebuilt prompt p0 + A m is the server's up to one float32 rounding
    ss = run.loop.server_state
    name = prompt_name(ss[MODEL])
    a = projection(run.wb.template[name].numel(), 8, 0, 0.05)
    client = prompt_of(run.wb.template[name], a, ss["fedbpt.dist"]["mean"])
    assert torch.allclose(client, ss[MODEL][name], rtol=0, atol=1e-6)
