"""FedBPT: the client sees only an inference API and starts its CMA-ES from a light copy of
the global one; the server tells the clients' final means, ranked by their fitness, to a
server-level CMA-ES (checked by hand) and moves the prompt along the fixed projection."""

from __future__ import annotations

import json
import math
import warnings

import cma
import numpy as np
import pytest
import torch

from fedfm.aggregators.fedbpt import (FedBPTServer, global_es, local_mu, next_client_sigma, projection, prompt_name,
                                      prompt_of, sigma_from_clients)
from fedfm.aggregators.zo_payload import WEIGHT
from fedfm.config import from_dict
from fedfm.core.protocols import RoundContext
from fedfm.core.types import MODEL
from fedfm.learners.blackbox_api import make_inference_api
from fedfm.learners.fedbpt import FedBPTParams, local_es, search
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
    es = local_es(np.zeros(4), 1.0, np.eye(4), params, 3)
    batches = cycle_batches(wb.context(0, 1), torch.Generator().manual_seed(0))
    final, sigma_sq, metrics = search(api, batches, before[name], a, es, params)
    assert metrics["forward_passes"] == 8.0 and final.shape == (4,) and sigma_sq >= 1.0  # the first iteration's 1.0^2
    after = get_state(wb.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="expected"):
        api.loss(torch.zeros(3), batch)


def server_round(fitness, weights=(1.0, 1.0), sigma_sq=(2.0, 2.0)):
    params = FedBPTParams(dim=2, sigma0=1.0, popsize=4)
    server = FedBPTServer(params, 2)
    model = {"prompt_encoder.default.embedding.weight": torch.zeros(3, 2), "head": torch.ones(2)}
    ss = {MODEL: model, **server.init(model)}
    pay = [{"mean": torch.tensor(x, dtype=torch.float64), "fitness": torch.tensor([f], dtype=torch.float64),
            "sigma_sq": torch.tensor([s], dtype=torch.float64), WEIGHT: torch.tensor([w])}
           for x, f, s, w in zip(([1.0, 0.0], [0.0, 1.0]), fitness, sigma_sq, weights)]
    ctx = RoundContext(1, 0, torch.Generator(), 2, sample_size=2)
    groups, delta = server.combine(ss, pay, {}, ctx)
    return server, ss, groups, delta


def test_server_ranks_the_client_means_by_fitness_by_hand():
    # Two clients, means (1, 0) and (0, 1), fitness 0.1 and 0.9 (lower is better). Server
    # CMA-ES: population = parents = m = 2, mean 0; cma's recombination weights for 2 parents
    # are ln(2.5) - ln(i) normalised: 0.916291 / 1.139434 = 0.804163 and 0.223144 / 1.139434
    # = 0.195837; the mean learning rate is 1, so m <- 0.804163 (1, 0) + 0.195837 (0, 1).
    # The step size told with: popsize 4 has mu_local = 2, and sigma^2 sums 2 + 2:
    #   sqrt(4 / m / mu_local) = sqrt(4 / 2 / 2) = 1.
    w1, w2 = math.log(2.5), math.log(2.5) - math.log(2)
    assert w1 / (w1 + w2) == pytest.approx(0.804163, abs=1e-6)
    assert local_mu(FedBPTParams(dim=2, popsize=4)) == 2 and sigma_from_clients([2.0, 2.0], 2, 2) == 1.0
    server, ss, groups, delta = server_round((0.1, 0.9))
    dist = groups["fedbpt.dist"]
    assert dist["mean"].tolist() == pytest.approx([w1 / (w1 + w2), w2 / (w1 + w2)], abs=1e-12)
    assert dist["mean"].tolist() == pytest.approx([0.804163, 0.195837], abs=1e-6)  # a weighted mean would give (0.5, 0.5)
    # ranked by fitness, not weighted by example counts: swapping the fitness swaps the mean,
    # and weights 1 and 3 change nothing
    assert server_round((0.9, 0.1))[2]["fedbpt.dist"]["mean"].tolist() == pytest.approx([0.195837, 0.804163], abs=1e-6)
    assert torch.equal(server_round((0.1, 0.9), weights=(1.0, 3.0))[2]["fedbpt.dist"]["mean"], dist["mean"])
    # the history is kept: the two means and fitnesses, 2 told, step size 1 set before the tell
    assert dist["sol"].tolist() == [[1.0, 0.0], [0.0, 1.0]] and dist["fit"].tolist() == [0.1, 0.9]
    assert dist["told"].tolist() == [2] and dist["sigma_set"].tolist() == [1.0]
    # the same tell on cma directly gives the same mean, step size and covariance
    es = cma.CMAEvolutionStrategy([0.0, 0.0], 1.0, {"popsize": 2, "CMA_mu": 2, "verbose": -9, "seed": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        es.ask()
        es.tell([np.array([1.0, 0.0]), np.array([0.0, 1.0])], [0.1, 0.9])
    assert dist["mean"].tolist() == es.mean.tolist() and dist["cov"].tolist() == np.asarray(es.sm.C).tolist()
    # clients' next step size: the server ES's own ratio times the one they started from (1.0)
    assert dist["sigma"].tolist() == [es.sigma / 1.0 * 1.0] and 0 < es.sigma < 1
    # the prompt moves to p0 + A m; the head gets a zero delta
    a = projection(6, 2, 0, FedBPTParams().projection_std)
    expected = (a @ dist["mean"].float()).view(3, 2)
    assert torch.allclose(delta["prompt_encoder.default.embedding.weight"], expected, atol=1e-7)
    assert torch.equal(delta["head"], torch.zeros(2))
    # clients are sent the mean, the step size and the covariance, not the State
    sent = server.broadcast({**ss, **groups})["fedbpt"]
    assert sorted(sent) == ["cov", "mean", "sigma"] and torch.equal(sent["cov"], dist["cov"])


def test_the_step_size_rules_by_hand():
    # global: sqrt(sum sigma^2 / m / mu_local); three clients, mu_local 3: sqrt((1 + 3 + 5) / 3 / 3) = 1
    assert sigma_from_clients([1.0, 3.0, 5.0], 3, 3) == 1.0
    assert sigma_from_clients([8.0], 2, 1) == 2.0
    # next round's: (after / before) x the clients' current one; no floor at 0.5 (the
    # authors' clamp is undone by their next line): 0.5 / 2.0 x 1.0 = 0.25
    assert next_client_sigma(1.0, 0.9, 0.5) == pytest.approx(0.45)
    assert next_client_sigma(2.0, 0.5, 1.0) == 0.25


def test_too_few_clients_leave_the_distribution_unchanged():
    params = FedBPTParams(dim=2, popsize=4)
    server = FedBPTServer(params, 3)
    model = {"prompt_encoder.default.embedding.weight": torch.zeros(3, 2)}
    ss = {MODEL: model, **server.init(model)}
    one = [{"mean": torch.ones(2, dtype=torch.float64), "fitness": torch.tensor([0.5], dtype=torch.float64),
            "sigma_sq": torch.tensor([1.0], dtype=torch.float64), WEIGHT: torch.tensor([1.0])}] * 2
    groups, delta = server.combine(ss, one, {}, RoundContext(1, 0, torch.Generator(), 3, sample_size=3))
    dist = groups["fedbpt.dist"]
    assert dist["mean"].tolist() == [0.0, 0.0] and dist["told"].tolist() == [0] and dist["sol"].shape == (0, 2)
    assert torch.equal(delta["prompt_encoder.default.embedding.weight"], torch.zeros(3, 2))


def test_a_client_starts_from_a_light_copy_of_the_global_es():
    # the global ES after two rounds of tells, rebuilt from its history; a client's local ES
    # built from (mean, sigma, cov) alone asks exactly what cma's _copy_light of it asks
    params = FedBPTParams(dim=3, popsize=5, generations=4)
    rng = np.random.default_rng(0)
    group = {"sol": torch.tensor(rng.normal(size=(4, 3))), "fit": torch.tensor(rng.random(4)),
             "told": torch.tensor([2, 2]), "sigma_set": torch.tensor([0.8, 0.6], dtype=torch.float64)}
    es = global_es(3, 1.0, 2, 7, group)
    assert not np.allclose(es.sm.C, np.eye(3))  # the covariance has moved
    inopts = {"seed": 11, "maxiter": 4, "popsize": 5, "CMA_mu": None, "verbose": -9}
    want = es._copy_light(inopts=inopts).ask()
    got = local_es(es.mean.copy(), float(es.sigma), np.asarray(es.sm.C).copy(), params, 11).ask()
    assert all(np.array_equal(x, y) for x, y in zip(want, got))


def test_the_replayed_es_is_the_live_one_whatever_the_global_generator():
    # the server rebuilds its ES from the history every round; the points ask() draws (from
    # numpy's global generator, which clients reseed) do not enter tell
    group = {"sol": torch.zeros((0, 3), dtype=torch.float64), "fit": torch.zeros(0, dtype=torch.float64),
             "told": torch.zeros(0, dtype=torch.int64), "sigma_set": torch.zeros(0, dtype=torch.float64)}
    from fedfm.aggregators.fedbpt import server_tell

    live = global_es(3, 1.0, 2, 7, group)
    rng = np.random.default_rng(1)
    for r in range(3):
        sols, fits = rng.normal(size=(2, 3)), rng.random(2)
        np.random.seed(100 + r)  # what a client's cma does in between
        server_tell(live, sols, fits, 0.7, float(live.sigma))
        group = {"sol": torch.cat([group["sol"], torch.tensor(sols)]), "fit": torch.cat([group["fit"], torch.tensor(fits)]),
                 "told": torch.cat([group["told"], torch.tensor([2])]),
                 "sigma_set": torch.cat([group["sigma_set"], torch.tensor([0.7], dtype=torch.float64)])}
    replayed = global_es(3, 1.0, 2, 7, group)
    assert replayed.mean.tolist() == live.mean.tolist() and replayed.sigma == live.sigma
    assert np.array_equal(replayed.sm.C, live.sm.C)


def test_a_run_moves_only_the_prompt_along_the_projection(run):
    ss = run.loop.server_state
    name = prompt_name(ss[MODEL])
    dist = ss["fedbpt.dist"]
    assert bool((dist["mean"] != 0).any()) and float(dist["sigma"][0]) != 1.0
    assert dist["told"].tolist() == [2, 2] and dist["sol"].shape == (4, 8)  # both clients told, both rounds
    p0 = run.wb.template[name]
    a = projection(p0.numel(), 8, 0, 0.05)
    assert torch.allclose(ss[MODEL][name], p0 + (a @ dist["mean"].float()).view_as(p0), atol=1e-5)
    for k, v in ss[MODEL].items():
        if k != name:
            assert torch.equal(v, run.wb.template[k])  # the head is never tuned
    # the kept distribution is the server ES replayed from the kept history
    from fedfm.aggregators.fedbpt import GLOBAL_TAG
    from fedfm.core.seeding import derive_seed

    es = global_es(8, 1.0, 2, derive_seed(0, GLOBAL_TAG), dist)
    assert dist["mean"].tolist() == es.mean.tolist() and dist["sigma"].tolist() == [es.sigma]
    assert dist["cov"].tolist() == np.asarray(es.sm.C).tolist()
    # each client reported the fitness of its final mean and its step sizes
    rows = [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train_loss"] is not None for r in rows[1:])


def test_downlink_is_the_distribution_by_hand(run):
    # No State travels down: per client-round the broadcast is cov (8 x 8), mean (8) and
    # sigma (1), float64: 584 B of data, 8 B of header length and this header JSON padded to 8:
    header = ('{"__metadata__":{"round":"1"},'
              '"fedbpt/cov":{"dtype":"F64","shape":[8,8],"data_offsets":[0,512]},'
              '"fedbpt/mean":{"dtype":"F64","shape":[8],"data_offsets":[512,576]},'
              '"fedbpt/sigma":{"dtype":"F64","shape":[1],"data_offsets":[576,584]}}')
    size = 8 + len(header) + (-len(header)) % 8 + 584
    assert size == 8 + 232 + 584 == 824
    rows = [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines()]
    for r in rows[1:]:
        assert r["bytes_down"] == len(r["clients"]) * size == 2 * 824
    # the client's rebuilt prompt p0 + A m is the server's up to one float32 rounding
    ss = run.loop.server_state
    name = prompt_name(ss[MODEL])
    a = projection(run.wb.template[name].numel(), 8, 0, 0.05)
    client = prompt_of(run.wb.template[name], a, ss["fedbpt.dist"]["mean"])
    assert torch.allclose(client, ss[MODEL][name], rtol=0, atol=1e-6)


def test_resume_is_bit_identical(run, tmp_path):
    from fedfm.runtime.workbench import Workbench

    wb = Workbench(from_dict(fedbpt_raw(tmp_path, 2)))
    LocalRuntime(from_dict(fedbpt_raw(tmp_path, 1)), tmp_path / "resumed", workbench=wb).run()
    two = LocalRuntime(from_dict(fedbpt_raw(tmp_path, 2)), tmp_path / "resumed", resume=True, workbench=wb)
    two.run()
    want, got = run.loop.server_state, two.loop.server_state
    for k, v in want["fedbpt.dist"].items():
        assert torch.equal(v, got["fedbpt.dist"][k]), k
    assert all(torch.equal(v, got[MODEL][k]) for k, v in want[MODEL].items())


def test_the_loop_retries_then_skips_a_round_that_lost_a_client(tmp_path):
    """The server ES recombines all m sampled clients, so a round with fewer is retried or
    skipped like one below min_clients. Dropout 0.4, seed 0 (runtime/faults.drops_out):
    round 1, attempt 0: both clients return; round 2: client 0 drops in attempts 0 and 1."""
    raw = fedbpt_raw(tmp_path, rounds=2)
    raw["faults"] = {"dropout": 0.4}
    raw["federation"]["max_retries"] = 1
    out = tmp_path / "out"
    rt = LocalRuntime(from_dict(raw), out)
    rt.run()
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert rows[1]["round"] == 1 and rows[1]["fedbpt.told"] == 2 and rows[1]["attempts"] == 1
    assert rows[2]["skipped"] == "1 of the 2 updates the server part of learner fedbpt combines (2 sampled a round) kept after 2 attempt(s)"
    assert "fedbpt.told" not in rows[2] and rows[2]["clients"] == []
    assert rt.loop.server_state["fedbpt.dist"]["told"].tolist() == [2]  # only round 1 was told
