"""The chain: config short forms, per-stage bytes in metrics.jsonl, downlink deltas,
compact framing, and truncated or corrupted payloads raising CodecError."""

from __future__ import annotations

import json

import pytest
import torch

from fedfm.codecs import CodecChain, CodecContext, CodecError, parse_stage
from fedfm.config import ConfigError, from_dict
from fedfm.core.registry import RegistryError
from fedfm.runtime import LocalRuntime
from fedfm.runtime.store import ClientStore

REF = {
    "enc.layer.0.query.lora_A.weight": torch.zeros(4, 32),
    "enc.layer.0.query.lora_B.weight": torch.zeros(32, 4),
    "head.bias": torch.zeros(2),
}


def update(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in REF.items()}


def test_short_form_fills_the_primary_parameter_and_errors_name_the_field():
    name, params = parse_stage({"topk": 0.1, "error_feedback": True}, "codecs.up[0]")
    assert name == "topk" and params.fraction == 0.1 and params.error_feedback
    assert parse_stage({"quantize": 4, "block": 64}, "x")[1].bits == 4
    with pytest.raises(RegistryError, match=r"codecs.up\[1\].bits"):
        parse_stage({"quantize": 3}, "codecs.up[1]")
    with pytest.raises(RegistryError, match="exactly one of fraction or count"):
        parse_stage({"topk": 0.1, "count": 5}, "codecs.up[0]")
    with pytest.raises(RegistryError, match="known stages"):
        parse_stage({"topkk": 0.1}, "codecs.up[0]")


def test_config_typo_in_a_stage_fails_before_training(tmp_path):
    from tests.conftest import tiny_config

    raw = tiny_config(tmp_path, **{"codecs.up": [{"topk": 0.1}, {"quantize": 4, "blok": 8}]})
    with pytest.raises(ConfigError, match=r"codecs.up\[1\].blok"):
        from_dict(raw)


@pytest.mark.parametrize(
    "specs",
    [
        [{"topk": 0.2, "error_feedback": True}, {"quantize": 4, "block": 16}, {"compact": True}, {"checksum": True}],
        [{"randk": 0.3}, {"bf16": True}, {"compact": True}],
        [{"fp16": True}, {"quantize": 8}],
        [{"threshold": 0.5}, {"quantize": 2}, {"compact": True}],
    ],
)
def test_chains_round_trip_names_shapes_and_kept_entries(tmp_path, specs):
    chain = CodecChain.from_specs(specs, "codecs.up")
    ctx = CodecContext("up", 1, 0, REF, store=ClientStore(tmp_path))
    x = update()
    state, meta = chain.decode(chain.encode(x, {"cid": "0"}, ctx).data, ctx)
    assert meta["cid"] == "0"
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in REF.items()}
    for k in REF:
        kept = state[k] != 0
        if not kept.any():  # a threshold may keep nothing of a small tensor
            assert "threshold" in specs[0] and (x[k].abs() < 0.5).all()
            continue
        # Within one quantization level of the block (2-bit per tensor: 2m/3) of the sent value.
        assert (state[k][kept] - x[k][kept]).abs().max() <= x[k].abs().max() * 0.7 + 1e-6


def test_compact_framing_is_lossless_and_smaller():
    plain = CodecChain.from_specs([{"topk": 0.25}, {"quantize": 4}], "codecs.up")
    compact = CodecChain.from_specs([{"topk": 0.25}, {"quantize": 4}, {"compact": True}], "codecs.up")
    ctx = CodecContext("up", 1, 0, REF)
    a, b = plain.encode(update(), {}, ctx), compact.encode(update(), {}, ctx)
    assert b.nbytes < a.nbytes
    sa, sb = plain.decode(a.data, ctx)[0], compact.decode(b.data, ctx)[0]
    assert all(torch.equal(sa[k], sb[k]) for k in REF)


def test_downlink_delta_is_against_what_the_client_last_received(tmp_path):
    store = ClientStore(tmp_path)
    chain = CodecChain.from_specs([{"delta": True}], "codecs.down")
    s1, s2 = update(1), update(2)
    ctx = CodecContext("down", 1, 7, REF, store=store)
    first, _ = chain.decode(chain.encode(s1, {}, ctx).data, ctx)
    assert all(torch.equal(first[k], s1[k]) for k in REF)  # nothing received yet: full State
    ctx2 = CodecContext("down", 2, 7, REF, store=store)
    enc = chain.encode(s2, {}, ctx2)
    from fedfm.codecs import from_bytes

    sent = from_bytes(enc.data)
    assert sent.meta["__delta"] == "1"
    assert torch.allclose(sent.tensors["head.bias"], s2["head.bias"] - s1["head.bias"])
    second, _ = chain.decode(enc.data, ctx2)
    assert all(torch.allclose(second[k], s2[k]) for k in REF)
    with pytest.raises(CodecError, match="codecs.down only"):
        chain.encode(s1, {}, CodecContext("up", 1, 7, REF, store=store))


def test_lossy_downlink_delta_corrects_its_own_error(tmp_path):
    """Deltas are taken against the client's reconstruction, so the error does not grow."""
    store = ClientStore(tmp_path)
    chain = CodecChain.from_specs([{"delta": True}, {"quantize": 2}], "codecs.down")
    s = update(3)
    errs = []
    for rnd in range(1, 6):
        ctx = CodecContext("down", rnd, 0, REF, store=store)
        got, _ = chain.decode(chain.encode(s, {}, ctx).data, ctx)
        errs.append(max(float((got[k] - s[k]).abs().max()) for k in REF))
    assert errs[-1] < errs[0] / 4


def corrupt_cases(data: bytes) -> dict[str, bytes]:
    n = int.from_bytes(data[:8], "little")
    body = bytearray(data)
    body[8 + 2] = ord("!")  # breaks the JSON header
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF  # a value byte
    return {"empty": b"", "short": data[:5], "truncated": data[:-7], "header cut": data[: 8 + n // 2], "bad json": bytes(body), "flipped": bytes(flipped)}


@pytest.mark.parametrize("case", ["empty", "short", "truncated", "header cut", "bad json", "flipped"])
def test_truncated_or_corrupted_payloads_raise_codec_error(tmp_path, case):
    chain = CodecChain.from_specs([{"topk": 0.2}, {"quantize": 4}, {"compact": True}, {"checksum": True}], "codecs.up")
    ctx = CodecContext("up", 1, 2, REF)
    data = corrupt_cases(chain.encode(update(), {}, ctx).data)[case]
    with pytest.raises(CodecError):
        chain.decode(data, ctx)


def test_corrupted_indices_are_caught_without_checksum():
    chain = CodecChain.from_specs([{"topk": 0.05}], "codecs.up")
    ref = {"w": torch.zeros(1000)}
    ctx = CodecContext("up", 1, 0, ref)
    from fedfm.codecs import Payload, from_bytes, to_bytes

    p = from_bytes(chain.encode({"w": torch.randn(1000)}, {}, ctx).data)
    gaps = p.tensors["w.__delta"].clone()
    gaps[3] = 0  # indices no longer strictly increasing
    with pytest.raises(CodecError, match="stage 'topk'.*strictly increasing"):
        chain.decode(to_bytes(Payload({**p.tensors, "w.__delta": gaps}, p.meta)), ctx)
    with pytest.raises(CodecError, match="values"):
        chain.decode(to_bytes(Payload({**p.tensors, "w.__values": p.tensors["w.__values"][:-1]}, p.meta)), ctx)


def test_metrics_record_bytes_before_and_after_each_stage(tmp_path):
    from tests.conftest import tiny_config

    raw = tiny_config(
        tmp_path,
        rounds=2,
        **{
            "train.epochs": 1,
            "codecs.up": [{"topk": 0.1, "error_feedback": True}, {"quantize": 4}, {"compact": True}],
            "codecs.down": [{"delta": True}, {"quantize": 8}, {"compact": True}],
        },
    )
    rt = LocalRuntime(from_dict(raw), tmp_path / "run")
    rt.run()
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row in rows[1:]:
        up, down = row["codec_bytes"]["up"], row["codec_bytes"]["down"]
        assert list(up) == ["input", "topk", "quantize", "compact", "payloads"]
        assert up["payloads"] == len(row["clients"]) == 2
        assert up["compact"] == row["bytes_up"] and down["compact"] == row["bytes_down"]
        assert up["input"] > 5 * up["compact"] > 0
        assert down["input"] > 2 * down["compact"]
    assert (tmp_path / "run" / "clients" / "0" / "ef_up_topk.safetensors").exists()
    assert (tmp_path / "run" / "clients" / "1" / "down_last.safetensors").exists()


def test_example_configs_validate():
    from pathlib import Path

    from fedfm.config import load_config

    paths = sorted((Path(__file__).parents[1] / "examples" / "compression").glob("*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        exp = load_config(path)
        assert exp.codecs.up, path


def test_the_downlink_delta_is_taken_per_tensor_and_remembers_what_was_not_sent(tmp_path):
    # round 1: {head, layer0} whole; round 2: {head, layer1}: head as a delta, layer1 whole;
    # round 3: {head, layer0}: layer0 as a delta against round 1's value (kept while unsent)
    from fedfm.codecs import Payload
    from fedfm.codecs.downlink import DownlinkDelta

    stage = DownlinkDelta()
    ctx = CodecContext(direction="down", round=1, cid=3, reference={}, store=ClientStore(tmp_path / "s"))
    head, l0, l1 = torch.tensor([1.0, 2.0]), torch.tensor([3.0]), torch.tensor([5.0, 5.0])

    def send(tensors):
        sent = stage.encode(Payload(tensors, {}), ctx)
        got = stage.decode(Payload(sent.tensors, dict(sent.meta)), ctx)
        assert all(torch.equal(got.tensors[k], tensors[k]) for k in tensors)
        return sent

    assert send({"head": head, "layer0": l0}).meta["__delta"] == "0"
    sent = send({"head": head + 1, "layer1": l1})
    assert sent.meta["__delta"] == '["head"]' and sent.tensors["head"].tolist() == [1.0, 1.0] and torch.equal(sent.tensors["layer1"], l1)
    sent = send({"head": head + 1, "layer0": l0 + 0.5})
    assert sent.meta["__delta"] == "1" and sent.tensors["layer0"].tolist() == [0.5] and sent.tensors["head"].tolist() == [0.0, 0.0]
    with pytest.raises(CodecError, match=r"a downlink delta of \['layer2'\] arrived but the last received State lacks them"):
        stage.decode(Payload({"layer2": l0}, {"__delta": '["layer2"]'}), ctx)
    with pytest.raises(CodecError, match=r"lacks a valid '__delta' entry \(got '\[\"nope\"\]'\)"):
        stage.decode(Payload({"head": head}, {"__delta": '["nope"]'}), ctx)
