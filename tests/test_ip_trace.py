"""Client-unique watermarks: among 8 tiny clients, tracing names the one a copy came from;
the thief's removal attacks through fedfm's codecs and training loop."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import tiny_config
from fedfm.cli import app
from fedfm.config import TrainConfig, from_dict
from fedfm.ip import EmbedSettings, Trace, TriggerSpec, Verdict, client_copy, client_key, p_value, trace
from fedfm.ip.unique import bonferroni
from fedfm.ip.loading import build_base
from fedfm.ip.removal import codec_roundtrip, fine_tune

MASTER = "federation-master-key"
CLIENTS = 8
# 16 triggers per client, 4 labels: a copy answers its own set (16/16, p = 4**-16) and the
# other 7 sets at chance (1/4, about 4 of 16).
SPEC = TriggerSpec("text_classification", size=16, length=8, num_labels=4)
# The tiny model learns the triggers through LoRA and its head together (freeze=()).
SETTINGS = EmbedSettings(threshold=1.0, max_steps=150, lr=0.05, batch_size=16, freeze=())


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trace")
    raw = tiny_config(tmp, **{"model.num_labels": 4})
    exp = from_dict(raw)
    base, template = build_base(exp)
    return tmp, raw, base, template


def test_tracing_names_the_right_client_among_8(setup):
    tmp, raw, base, template = setup
    copies = {cid: client_copy(base, template, MASTER, cid, SPEC, SETTINGS, seed=0) for cid in range(CLIENTS)}
    for cid, result in copies.items():
        assert result.accuracy == 1.0, f"client {cid}: {result.steps} steps"
        found = trace(base, result.state, MASTER, range(CLIENTS), SPEC)
        assert found.suspect == cid
        assert found.verdicts[cid].hits == 16 and found.p_raw == pytest.approx(4.0**-16)
        assert found.p_value == pytest.approx(8 * 4.0**-16)  # the best of 8 keys: Bonferroni
        others = [v.hits for c, v in found.verdicts.items() if c != cid]
        assert max(others) <= 10  # chance level is 4 of 16
    # A model that carries no client key: nobody is named with any confidence.
    clean = trace(base, template, MASTER, range(CLIENTS), SPEC)
    assert clean.p_value > 1e-3

    # The command line, on client 5's copy saved as a .safetensors beside a config.yaml.
    leak = tmp / "leak"
    leak.mkdir()
    (leak / "config.yaml").write_text(yaml.safe_dump(from_dict(raw).dump()))
    save_file(copies[5].state, str(leak / "model.safetensors"))
    size = ["--trigger-size", "16", "--trigger-length", "8"]
    cli = CliRunner()
    done = cli.invoke(app, ["watermark", "trace", str(leak / "model.safetensors"), "--key", MASTER, "--clients", "8", *size])
    assert done.exit_code == 0, done.output
    assert "suspect: client 5" in done.output and "Bonferroni-adjusted over 8 keys" in done.output
    keys = [x for c in range(3) for x in ("--keys", client_key(MASTER, c + 4))]  # clients 4, 5, 6 as 0, 1, 2
    done = cli.invoke(app, ["watermark", "trace", str(leak / "model.safetensors"), *keys, *size])
    assert "suspect: client 1" in done.output
    bad = cli.invoke(app, ["watermark", "trace", str(leak / "model.safetensors"), "--key", MASTER])
    assert bad.exit_code == 2 and "--clients" in bad.output
    # the master key from the environment, never on the command line
    done = cli.invoke(app, ["watermark", "trace", str(leak / "model.safetensors"), "--key-env", "FEDFM_TEST_MASTER",
                            "--clients", "8", *size], env={"FEDFM_TEST_MASTER": MASTER})
    assert done.exit_code == 0 and "suspect: client 5" in done.output, done.output
    unset = cli.invoke(app, ["watermark", "trace", str(leak / "model.safetensors"), "--key-env", "FEDFM_UNSET_KEY",
                             "--clients", "8"], env={"FEDFM_UNSET_KEY": ""})
    assert unset.exit_code == 2 and "FEDFM_UNSET_KEY (--key-env) is not set or empty" in unset.output


def test_trace_p_value_is_bonferroni_adjusted_over_the_keys():
    # 8 keys of 32 triggers, 2 labels. The suspect answers 29 of its 32:
    # raw P[X >= 29] = (C(32,29) + C(32,30) + C(32,31) + 1) / 2^32 = 5489 / 2^32 = 1.27801e-6,
    # adjusted 8 x that = 43912 / 2^32 = 1.02241e-5.
    hits = {0: 16, 1: 18, 2: 29, 3: 15, 4: 20, 5: 17, 6: 16, 7: 21}
    verdicts = {c: Verdict(h, 32, 0.5, p_value(h, 32, 0.5)) for c, h in hits.items()}
    found = Trace(2, verdicts)
    assert found.p_raw == pytest.approx(5489 / 2**32, rel=1e-9)
    assert found.p_value == pytest.approx(43912 / 2**32, rel=1e-9)
    assert found.verified(1e-4) and not found.verified(1e-5)  # raw 1.3e-6 would pass 1e-5
    # A model with no key: the best of 8 answers 22/32, raw P[X >= 22] = 0.0250512 "passes"
    # 0.05; adjusted 8 x 0.0250512 = 0.200410 does not. 18/32 (P = 0.298307) caps at 1.
    hits[2] = 22
    chance = Trace(2, {c: Verdict(h, 32, 0.5, p_value(h, 32, 0.5)) for c, h in hits.items()})
    assert chance.p_raw == pytest.approx(0.0250512, abs=1e-7) and chance.p_value == pytest.approx(0.200410, abs=1e-6)
    assert not chance.verified(0.05)
    assert bonferroni(0.298307, 8) == 1.0 and bonferroni(0.01, 1) == 0.01
    with pytest.raises(ValueError, match="at least one"):
        bonferroni(0.5, 0)


def test_codec_attacks_by_hand(setup):
    _, _, _, template = setup
    state = {"w": torch.tensor([1.0, -0.5, 0.25, 0.0]), "b": torch.tensor([2.0, -4.0])}
    # int8, nearest level: scale m = max|x|, step s = 2m/255; error <= s/2 per entry.
    q8, nbytes = codec_roundtrip(state, [{"name": "quantize", "bits": 8, "stochastic": False}])
    assert (q8["w"] - state["w"]).abs().max() <= (2 * 1.0 / 255) / 2 + 1e-7
    assert (q8["b"] - state["b"]).abs().max() <= (2 * 4.0 / 255) / 2 + 1e-7
    assert nbytes > 0
    # top-k 50%: the 2 largest magnitudes of w (1.0, -0.5) and the larger of b (-4.0) stay.
    pruned, _ = codec_roundtrip(state, [{"topk": 0.5}])
    assert pruned["w"].tolist() == [1.0, -0.5, 0.0, 0.0]
    assert pruned["b"].tolist() == [0.0, -4.0]
    # int4 on the real State keeps every name and shape.
    q4, _ = codec_roundtrip(template, [{"quantize": 4}])
    assert {k: v.shape for k, v in q4.items()} == {k: v.shape for k, v in template.items()}


def test_thief_fine_tune_runs_the_client_loop(setup):
    _, _, base, template = setup
    examples = [{"input_ids": [101, 2000 + i, 102], "label": i % 4} for i in range(10)]
    # 10 examples, batch 4, 1 epoch: ceil(10/4) = 3 steps.
    state, metrics = fine_tune(base, template, examples, TrainConfig(lr=0.01, batch_size=4, epochs=1), seed=0)
    assert metrics["steps"] == 3 and metrics["examples_seen"] == 10
    assert any(not torch.equal(state[k], template[k]) for k in template)
    with pytest.raises(ValueError, match="clean example"):
        fine_tune(base, template, [], TrainConfig())
