"""Audit of recent features: FedRA's layer count, profile keys' readers, ..."""

from __future__ import annotations

import pytest
import torch

from fedfm.aggregators.fedra import FedRAServer
from fedfm.core.types import MODEL, ClientSpec


class _Stack(torch.nn.Module):
    """A model of 3 layers (``encoder.layer.<i>``) and a head."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Module()
        self.encoder.layer = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
        self.head = torch.nn.Linear(2, 2)


def test_fedra_allocates_among_the_models_layers_frozen_ones_included():
    # the top layer frozen: the trainable State names layers 0 and 1 only
    state = {"encoder.layer.0.weight": torch.zeros(2, 2), "encoder.layer.1.weight": torch.zeros(2, 2),
             "head.weight": torch.zeros(2, 2)}
    server = FedRAServer(None, 1)
    server.bind_model(_Stack())
    client = ClientSpec(0, [0], {"role": "big", "layers": 3})
    assert server.client_reference(0, client.profile, state) == state
    ins = server.instruction(1, {MODEL: state}, client, 0)
    assert ins.config["layers"] == [0, 1, 2]  # all 3 of the model's layers, the frozen one too
    with pytest.raises(ValueError, match=r"profile.layers = 4 exceeds the model's 3"):
        server.client_reference(0, {"layers": 4}, state)
    # without the model, the State's 2 layers (the count before bind_model)
    with pytest.raises(ValueError, match=r"profile.layers = 3 exceeds the model's 2"):
        FedRAServer(None, 1).client_reference(0, {"layers": 3}, state)


def _exp(learner: str, peft: str, profile: dict):
    from types import SimpleNamespace as NS

    role = NS(name="east", profile=profile)
    return NS(learner=NS(name=learner), peft=NS(method=peft), server_steps=[], federation=NS(roles=[role]))


def test_profile_domain_is_read_by_learner_fedapt_only():
    import fedfm.personalize.fedapt  # noqa: F401  (registers domain)
    from fedfm.core.profile_keys import unread_profile_keys

    # the fedapt tuner under learner local never reads the domain (personalize/fedapt.client_domain)
    lines = unread_profile_keys(_exp("local", "fedapt", {"domain": 1}))
    assert lines == ["federation.roles 'east': profile.domain is read only with learner.name fedapt; this run ignores it"]
    assert unread_profile_keys(_exp("fedapt", "fedapt", {"domain": 1})) == []


@pytest.mark.parametrize("model, given", [
    ("fedfm.privacy.noise:DpNoiseParams", {"noise_multiplier": float("inf")}),
    ("fedfm.privacy.noise:DpNoiseParams", {"target_epsilon": float("nan")}),
    ("fedfm.privacy.clipping:DpClipParams", {"clip_norm": float("inf")}),
    ("fedfm.privacy.distributed:DpClientNoiseParams", {"clip_norm": 1.0, "noise_multiplier": float("inf"), "clients_per_round": 2}),
    ("fedfm.privacy.dp_sgd:DpSgdParams", {"clip_norm": float("inf"), "noise_multiplier": 1.0}),
    ("fedfm.privacy.secagg.params:SecAggParams", {"bound": float("inf")}),
])
def test_infinite_privacy_settings_are_refused(model, given):
    # an infinite sigma turned every coordinate of the model into inf/NaN; an infinite clip norm clipped nothing
    import importlib

    from pydantic import ValidationError

    module, _, name = model.partition(":")
    with pytest.raises(ValidationError, match="finite number"):
        getattr(importlib.import_module(module), name)(**given)


@pytest.mark.parametrize("key, spec, field", [
    ("server_steps", [{"name": "sim_clock", "deadline_s": float("inf")}], r"server_steps\[0\]\.deadline_s"),
    ("server_steps", [{"name": "clip_updates", "max_norm": float("inf")}], r"server_steps\[0\]\.max_norm"),
    ("learner", {"name": "mezo", "lr": float("inf")}, r"learner\.lr"),
    ("federation.partitioner", {"name": "dirichlet", "alpha": float("inf")}, r"federation\.partitioner\.alpha"),
])
def test_every_component_refuses_inf_and_nan_by_field(tmp_path, key, spec, field):
    # each passed gt=0 before: a deadline of inf, a clip of inf, a learning rate of inf
    from conftest import tiny_config
    from fedfm.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=field + ": Input should be a finite number"):
        from_dict(tiny_config(tmp_path, **{key: spec}))


def test_a_second_sparsifier_is_refused_by_place():
    from fedfm.codecs.chain import CodecChain
    from fedfm.core.registry import RegistryError

    # [randk, topk] was accepted and every payload then failed to decode ("sparse values arrived without indices")
    with pytest.raises(RegistryError, match=r"codecs.up\[1\]: 'topk' after 'randk' \(codecs.up\[0\]\).*keep one sparsifier"):
        CodecChain.from_specs([{"name": "randk", "fraction": 0.5}, {"name": "topk", "fraction": 0.5}], "codecs.up")
    assert CodecChain.from_specs([{"name": "topk", "fraction": 0.5}, {"name": "fp16"}], "codecs.up").names == ["topk", "fp16"]


def test_a_second_quantize_is_refused_by_place():
    from fedfm.codecs.chain import CodecChain
    from fedfm.core.registry import RegistryError

    # [quantize, fp16, quantize] was accepted and every payload then failed to decode ("__scale is missing")
    specs = [{"name": "quantize", "bits": 8}, {"name": "fp16"}, {"name": "quantize", "bits": 8}]
    with pytest.raises(RegistryError, match=r"codecs.down\[2\]: a second 'quantize' \(codecs.down\[0\] is the first\)"):
        CodecChain.from_specs(specs, "codecs.down")


def test_the_dp_outlook_warns_on_the_multiplier_adaptive_clipping_raises(tmp_path):
    from conftest import tiny_config
    from fedfm.config import from_dict
    from fedfm.privacy.outlook import dp_outlook

    # sigma 0.99 and count noise 0.5: sigma_Delta = (0.99^-2 - (2 * 0.5)^-2)^-1/2 = (1.020304 - 1)^-1/2 = 7.018,
    # above the 4 clients per round (std 7.018 / 4 = 1.754 clip norms); sigma alone (0.99) was not warned about
    steps = [{"name": "dp_clip", "clip_norm": 0.5, "target_quantile": 0.5, "count_noise": 0.5},
             {"name": "dp_noise", "noise_multiplier": 0.99}]
    exp = from_dict(tiny_config(tmp_path, server_steps=steps, **{"federation.clients": 8, "federation.clients_per_round": 4}))
    lines, warnings = dp_outlook(exp)
    assert "noise_multiplier 0.99 (updates: 7.018, raised for adaptive clipping) (given), 4 of 8" in lines[0]
    assert len(warnings) == 1 and "noise_multiplier 7.018 on the updates with 4 clients per round adds noise of std 1.754" in warnings[0]


def test_a_resume_from_cpu_to_auto_on_a_cpu_machine_is_the_same_device(monkeypatch):
    from fedfm.runtime.checkpoint import math_lever_changes

    seq = {"transport": "sequential", "device": "cpu", "batch_clients": 4, "batch_kernel": "auto"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert math_lever_changes(seq, {**seq, "device": "auto"}) == []  # warned "was 'cpu', now 'auto'" before
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert math_lever_changes(seq, {**seq, "device": "auto"}) == ["runtime.device: was 'cpu', now 'auto'"]


def test_a_held_back_layer_gets_a_zero_delta_that_momentum_still_moves():
    from fedfm.aggregators.base import aggregators
    from fedfm.aggregators.fedra import per_layer_delta
    from fedfm.aggregators.server_opt import AvgMParams, fedavgm, sgd, SgdParams

    model = {"encoder.layer.0.w": torch.zeros(1), "encoder.layer.1.w": torch.zeros(1)}
    krum = aggregators.get("krum")
    # layer 0 held by 4 clients (Krum f=1 needs 4), layer 1 by 2: held back
    payloads = [{"encoder.layer.0.w": torch.tensor([v]), **({"encoder.layer.1.w": torch.tensor([5.0])} if i < 2 else {})}
                for i, v in enumerate([1.0, 1.0, 1.0, 9.0])]
    notes: dict = {}
    delta, counts = per_layer_delta(model, payloads, [1.0] * 4, krum.obj, krum.params(f=1), notes)
    assert counts == {"0": 4, "1": 2} and float(delta["encoder.layer.1.w"]) == 0.0
    assert notes["held_back"] == {"layer 1": "2 holder(s), the rule combines at least 4"}
    # sgd: the held-back layer stays; fedavgm (momentum 0.5, last round's v = 2): it moves by 0.5 * 2 = 1
    assert float(sgd(model, delta, {}, SgdParams())[0]["encoder.layer.1.w"]) == 0.0
    moments = {"v": {"encoder.layer.0.w": torch.zeros(1), "encoder.layer.1.w": torch.tensor([2.0])}}
    assert float(fedavgm(model, delta, moments, AvgMParams(momentum=0.5))[0]["encoder.layer.1.w"]) == 1.0


def test_an_infinite_profile_speed_or_bandwidth_is_refused():
    from fedfm.runtime.capacity import profile_problems, resolve_link

    # speed .inf made a client's compute time 0 s, bandwidth .inf its transfers free
    assert profile_problems({"speed": float("inf"), "up_mbps": 5}, "r") == ["r: profile.speed must be a positive number, got inf"]
    with pytest.raises(ValueError, match=r"client 1: profile.bandwidth_mbps must be a positive number, got inf"):
        resolve_link({"bandwidth_mbps": float("inf")}, "client 1")
    assert resolve_link({"speed": 0.5, "bandwidth_mbps": 20}) == (0.5, 20.0, 20.0)


def test_a_resume_that_changes_the_threads_a_client_trains_with_on_processes_is_named():
    from fedfm.runtime.checkpoint import math_lever_changes

    seq = {"transport": "sequential", "device": "cpu", "threads": 2, "threads_per_worker": 1}
    procs = {**seq, "transport": "processes"}
    # sequential with 2 threads, then workers of 1: the clients' float sums change, the run's own thread count does not
    assert math_lever_changes(seq, procs) == [
        "each client trained with 2 torch thread(s), now 1 (runtime.threads 2, runtime.threads_per_worker 1)"]
    assert math_lever_changes(procs, {**procs, "threads_per_worker": 2}) == [
        "each client trained with 1 torch thread(s), now 2 (runtime.threads_per_worker 1, runtime.threads_per_worker 2)"]
    assert math_lever_changes({**seq, "threads": 1}, procs) == []  # the same bits (docs/speed.md)
    assert math_lever_changes({**seq, "threads": None}, procs) == []  # torch's default: not said by the settings


def test_a_profile_key_a_config_field_names_is_read_there(tmp_path):
    # ifca with profile_key: domain reads each client's domain; fedfm check and run warned
    # "profile.domain is read only with learner.name fedapt; this run ignores it"
    from conftest import tiny_config
    from fedfm.components import config_profile_keys
    from fedfm.config import from_dict
    from fedfm.core.profile_keys import unread_profile_keys

    roles = [{"name": "a", "count": 1, "profile": {"domain": 0}}, {"name": "b", "count": 1, "profile": {"domain": 1}}]
    exp = from_dict(tiny_config(tmp_path, **{"learner": {"name": "ifca", "assign": "profile", "profile_key": "domain"},
                                             "federation.roles": roles}))
    assert config_profile_keys(exp) == {"domain": "learner.profile_key"}
    assert unread_profile_keys(exp, config_profile_keys(exp)) == []
    assert unread_profile_keys(exp) == ["federation.roles 'a', 'b': profile.domain is read only with learner.name fedapt; "
                                        "this run ignores it"]  # without the named keys: the false warning


@pytest.mark.parametrize("learner, step", [
    ("fedra", {"name": "centered_clip", "tau": 1.0}),
    ("hetlora", {"name": "alie", "role": "bad"}),
    ("flexlora", {"name": "cluster_report", "source": "updates", "k": 2}),
])
def test_steps_that_line_updates_up_by_name_are_refused_with_per_client_payloads(tmp_path, learner, step):
    # fedra + centered_clip ran until the first round whose two clients trained different
    # layers, then stopped on a bare KeyError naming a LoRA tensor
    import re

    from conftest import tiny_config
    from fedfm.config import ConfigError, from_dict

    roles = [{"name": "good", "count": 1, "profile": {}}, {"name": "bad", "count": 1, "profile": {}}]
    raw = tiny_config(tmp_path, learner={"name": learner}, server_steps=[step], **{"federation.roles": roles})
    with pytest.raises(ConfigError, match=re.escape(f"server_steps[0] ({step['name']}) lines up every update of a round "
                                                    f"name by name, but learner {learner}'s clients")):
        from_dict(raw)


def test_a_profile_key_given_to_the_learner_says_where_it_goes(tmp_path):
    from conftest import tiny_config
    from fedfm.config import ConfigError, from_dict

    # "learner.layers: Extra inputs are not permitted; allowed: forward" said nothing of the roles
    with pytest.raises(ConfigError, match=r"learner\.layers: Extra inputs are not permitted; allowed: forward; 'layers' is a "
                                          r"client's profile key: federation\.roles\[\]\.profile\.layers"):
        from_dict(tiny_config(tmp_path, learner={"name": "fedra", "layers": 2}))


def test_a_server_step_that_misses_an_entry_is_named():
    # fedra + centered_clip ended the run on "error: 'base_model.model...lora_A.default.weight'" alone
    from types import SimpleNamespace as NS

    from fedfm.aggregators.centered_clip import CenteredClip, CenteredClipParams
    from fedfm.aggregators.pipeline import Pipeline
    from fedfm.core.types import Update

    pipe = Pipeline([CenteredClip(CenteredClipParams(tau=1.0))])
    ups = [Update(0, {"l.layer.0.w": torch.ones(2)}, 1), Update(1, {"l.layer.1.w": torch.ones(2)}, 1)]
    with pytest.raises(ValueError, match=r"server step 'centered_clip' \(stage updates, round 3\) found no entry 'l.layer.0.w'"):
        pipe.run("updates", ups, {}, NS(round=3), {})
