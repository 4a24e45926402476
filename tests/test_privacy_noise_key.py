"""The noise key: DP draws seeded from the config without it (the same numbers as before),
from a keystream under HMAC-SHA256(key, tags) with it (same key, same draws; another key,
other draws), read from FEDFM_DP_NOISE_KEY only, and an empty or short key refused."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY_BERT, tiny_config
from fedfm.config import ConfigError, from_dict
from fedfm.core.protocols import RoundContext
from fedfm.core.seeding import derive_seed
from fedfm.core.types import Instruction, Update
from fedfm.privacy import noise_key
from fedfm.privacy.clipping import DpClip, DpClipParams
from fedfm.privacy.distributed import NOISE_TAG, DpClientNoise, DpClientNoiseParams
from fedfm.privacy.dp_sgd import DpSgdAccountant, DpSgdAccountantParams, DpSgdLearner, DpSgdParams
from fedfm.privacy.noise import DpNoise, DpNoiseParams
from fedfm.runtime.workbench import Workbench

KEY_A = "a" * 32
KEY_B = "b" * 32


@pytest.fixture(autouse=True)
def no_key(monkeypatch):
    monkeypatch.delenv(noise_key.ENV, raising=False)


def central(seed=3, rnd=2):
    ctx = RoundContext(rnd, seed, torch.Generator().manual_seed(seed), 4, rounds=3, sample_size=4)
    ctx.notes = {"clip_norm": 2.0, "n": 4, "count_noise": None}
    delta = {"w": torch.zeros(40, 50), "b": torch.zeros(10)}
    return DpNoise(DpNoiseParams(noise_multiplier=1.5))(delta, ctx, {})


def share(cid=1, seed=1234, rnd=2):
    mw = DpClientNoise(DpClientNoiseParams(clip_norm=1.0, noise_multiplier=2.0, clients_per_round=4))
    return mw.after_train(Update(cid, {"w": torch.zeros(1000)}, 30), SimpleNamespace(seed=seed, round=rnd, cid=cid))


def test_the_key_is_read_from_the_environment_only(monkeypatch):
    assert noise_key.read_key() is None and noise_key.mode() == "seeded"
    monkeypatch.setenv("FEDFM_DP_NOISE_KEY", KEY_A)
    assert noise_key.read_key() == KEY_A.encode() and noise_key.mode() == "keyed"


@pytest.mark.parametrize("value, reason", [("", "is set but empty"), ("   ", "is set but empty"),
                                           ("short", "has 5 bytes, fewer than 16")])
def test_an_empty_or_short_key_is_refused_naming_the_variable(monkeypatch, tmp_path, value, reason):
    monkeypatch.setenv("FEDFM_DP_NOISE_KEY", value)
    with pytest.raises(ValueError, match=f"FEDFM_DP_NOISE_KEY {reason}"):
        noise_key.read_key()
    with pytest.raises(ValueError, match="FEDFM_DP_NOISE_KEY"):
        share()
    # at config time, before anything loads, when the run draws DP noise ...
    steps = [{"name": "dp_clip", "clip_norm": 1.0}, {"name": "dp_noise", "noise_multiplier": 1.0}]
    with pytest.raises(ConfigError, match=f"FEDFM_DP_NOISE_KEY {reason}"):
        from_dict(tiny_config(tmp_path, server_steps=steps))
    from_dict(tiny_config(tmp_path))  # ... and only then


def test_without_the_key_the_draws_are_the_seeded_ones():
    # central: torch.randn of the round's generator, in sorted name order ("b" then "w"), std 1.5 * 2 / 4
    noised, _, m = central()
    g = torch.Generator().manual_seed(3)
    b, w = (torch.randn(s, generator=g, dtype=torch.float64) * 0.75 for s in [(10,), (40, 50)])
    assert torch.equal(noised["b"], b.float()) and torch.equal(noised["w"], w.float())
    assert m["noise"] == "seeded"
    # a client's share: the generator of derive_seed(client seed, 0xD9), std 2 * 1 / sqrt(4) = 1
    out = share()
    g = torch.Generator().manual_seed(derive_seed(1234, NOISE_TAG))
    assert torch.equal(out.payload["w"], torch.randn(1000, generator=g, dtype=torch.float64).float())
    assert out.metrics["dp_client_noise.keyed"] == 0.0


def test_same_key_same_noise_other_key_other_noise(monkeypatch):
    monkeypatch.setenv("FEDFM_DP_NOISE_KEY", KEY_A)
    a1, _, m = central()
    a2, _, _ = central()
    s1, s2 = share(), share()
    assert m["noise"] == "keyed" and s1.metrics["dp_client_noise.keyed"] == 1.0
    assert torch.equal(a1["w"], a2["w"]) and torch.equal(s1.payload["w"], s2.payload["w"])
    # the draws are the keystream under HMAC-SHA256(key, purpose, tags)
    src = noise_key.KeyedSource(KEY_A.encode(), "dp_noise", (3, 2))
    assert torch.equal(a1["b"], (src.normal((10,)) * 0.75).float())
    assert not torch.equal(share(rnd=3).payload["w"], s1.payload["w"])  # another round, other noise
    assert not torch.equal(share(cid=2).payload["w"], s1.payload["w"])  # another client, other noise
    monkeypatch.setenv("FEDFM_DP_NOISE_KEY", KEY_B)
    b1, _, _ = central()
    assert not torch.equal(a1["w"], b1["w"]) and not torch.equal(share().payload["w"], s1.payload["w"])
    monkeypatch.delenv("FEDFM_DP_NOISE_KEY")
    seeded, _, _ = central()
    assert not torch.equal(seeded["w"], a1["w"])


def test_keyed_draws_are_standard_normal_and_uniform():
    src = noise_key.KeyedSource(KEY_A.encode(), "test", (0,))
    z = src.normal((200_001,))  # odd: the last Box-Muller pair is cut
    assert z.dtype == torch.float64 and z.shape == (200_001,)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1.0) < 0.01  # std of the estimates ~0.002
    u = src.uniform(100_000)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0 and abs(float(u.mean()) - 0.5) < 0.005
    assert float(noise_key.KeyedSource(KEY_A.encode(), "test", (0,)).normal(())) == float(z[0])  # shape (): one draw


def test_torch_keeps_32_bits_of_a_seed_which_is_why_the_keyed_path_uses_a_keystream():
    same = [torch.randn(3, generator=torch.Generator().manual_seed(s)) for s in (5, 5 + 2**32)]
    assert torch.equal(same[0], same[1])


def test_the_noise_metric_of_the_steps(monkeypatch):
    assert noise_key.summarize([1.0, 1.0]) == "keyed" and noise_key.summarize([0.0, None]) == "seeded"
    assert noise_key.summarize([1.0, 0.0, None]) == "mixed"
    ctx = RoundContext(1, 0, torch.Generator().manual_seed(0), 4, rounds=3, sample_size=4)
    ups = [Update(i, {"w": torch.zeros(2)}, 1, metrics={"dp_client_noise.keyed": float(i < 3)}) for i in range(4)]
    _, _, m = DpNoise(DpNoiseParams(mode="distributed", noise_multiplier=1.0))(ups, ctx, {})
    assert m["noise"] == "mixed" and m["keyed_clients"] == 3
    # adaptive clipping's count noise: seeded = the round generator's first normal draw
    clip = DpClip(DpClipParams(clip_norm=1.0, target_quantile=0.5, clip_lr=0.2, count_noise=1.0))
    ups = [Update(i, {"w": torch.tensor([0.1 * (i + 1), 0.0])}, 1) for i in range(4)]  # all unclipped
    _, _, m = clip(ups, ctx, {})
    draw = float(torch.randn((), generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert m["noised_unclipped_fraction"] == pytest.approx((4 + draw) / 4, abs=1e-12)
    monkeypatch.setenv("FEDFM_DP_NOISE_KEY", KEY_A)
    _, _, keyed = clip(ups, RoundContext(1, 0, torch.Generator().manual_seed(0), 4, rounds=3, sample_size=4), {})
    kdraw = float(noise_key.KeyedSource(KEY_A.encode(), "dp_clip.count", (0, 1)).normal(()))
    assert keyed["noised_unclipped_fraction"] == pytest.approx((4 + kdraw) / 4, abs=1e-12)


def dp_sgd_update(tmp_path, **over):
    raw = tiny_config(tmp_path, **{"model.config_overrides": {**TINY_BERT, "hidden_dropout_prob": 0.0,
                                                              "attention_probs_dropout_prob": 0.0},
                                   "train.optimizer": "sgd", "train.lr": 1.0, "train.steps": 1, "train.batch_size": 8,
                                   "learner": {"name": "dp_sgd", "clip_norm": 1e-9, "noise_multiplier": 1e9},
                                   "server_steps": [{"name": "dp_sgd_accountant"}], **over})
    wb = Workbench(from_dict(raw))
    ctx = wb.context(0, 1)
    learner = DpSgdLearner(DpSgdParams(clip_norm=1e-9, noise_multiplier=1e9))
    return wb, ctx, (lambda: learner.local_update(Instruction(1, 0, wb.initial_state()), ctx))


def test_dp_sgd_batches_and_noise(tmp_path, monkeypatch):
    # C = 1e-9, sigma = 1e9: the noise on the sum has std 1 and the clipped gradients are
    # negligible; SGD lr 1, one step: the delta is -noise / 8 (expected batch), cast to float32.
    wb, ctx, run = dp_sgd_update(tmp_path)
    seeded = run()
    g = torch.Generator().manual_seed(ctx.seed)
    chosen = torch.nonzero(torch.rand(len(ctx.examples), generator=g) < 8 / len(ctx.examples)).flatten().tolist()
    assert seeded.metrics["examples_seen"] == len(chosen) and seeded.metrics["dp_sgd.noise_keyed"] == 0.0
    names = [n for n, p in wb.model.named_parameters() if p.requires_grad]
    for name in names:  # the parameters in the learner's order draw from the same generator
        expect = -(torch.randn(seeded.payload[name].shape, generator=g, dtype=torch.float64) / 8)
        assert torch.allclose(seeded.payload[name].double(), expect, atol=1e-5), name
    monkeypatch.setenv("FEDFM_DP_NOISE_KEY", KEY_A)
    a1, a2 = run(), run()
    assert a1.metrics["dp_sgd.noise_keyed"] == 1.0 and a1.metrics["examples_seen"] == a2.metrics["examples_seen"]
    assert all(torch.equal(a1.payload[k], a2.payload[k]) for k in names)
    assert not torch.equal(a1.payload[names[0]], seeded.payload[names[0]])
    monkeypatch.setenv("FEDFM_DP_NOISE_KEY", KEY_B)
    assert not torch.equal(run().payload[names[0]], a1.payload[names[0]])
    step = DpSgdAccountant(DpSgdAccountantParams())
    _, _, m = step([a1, seeded], SimpleNamespace(num_clients=2), {})
    assert m["noise"] == "mixed"
    assert math.isfinite(m["epsilon_worst"])
