"""Server-side validation: NaN/Inf, wrong names or shapes, oversized payloads, a foreign
base model and corrupted bytes are rejected with their reason; the State is never touched."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from fedfm.config import from_dict
from fedfm.core.types import Update
from fedfm.runtime import LocalRuntime
from fedfm.runtime.outputs import read_metrics
from fedfm.runtime.validate import check_finite, check_fingerprint, check_names_shapes, check_size, check_update, check_weight

REF = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}  # (2, 3), (4,)


def test_plain_checks_with_hand_made_payloads():
    good = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    assert check_names_shapes(good, REF) is None and check_finite(good) is None
    assert check_finite({"a": torch.tensor([1.0, float("nan")]), "b": torch.ones(4)}) == "nan in 'a'"
    assert check_finite({"a": torch.ones(2, 3), "b": torch.tensor([float("-inf")])}) == "inf in 'b'"
    assert check_names_shapes({"a": torch.ones(3, 2), "b": torch.ones(4)}, REF) == "shape of 'a' is (3, 2), expected (2, 3)"
    assert "missing ['b'], unexpected ['c']" in check_names_shapes({"a": torch.ones(2, 3), "c": torch.ones(4)}, REF)
    assert check_size(101, 100) == "oversized: 101 bytes > max_update_bytes 100"
    assert check_size(100, 100) is None and check_size(10**9, None) is None
    assert check_fingerprint({"fingerprint": "aa"}, "bb") == "base-model fingerprint aa differs from the server's bb"
    assert check_fingerprint({}, "bb").startswith("no base-model fingerprint")
    assert check_fingerprint({}, None) is None
    assert check_weight({"num_examples": "0"}) == "num_examples 0 is not positive"
    assert check_update(good, {"fingerprint": "bb", "num_examples": "3"}, REF, "bb") is None


def test_bad_updates_are_rejected_and_never_touch_the_state(tmp_path):
    from conftest import tiny_config

    raw = tiny_config(
        tmp_path,
        **{
            "federation.clients": 5,
            "federation.on_too_few": "skip",
            "server.max_update_bytes": 1_000_000,
            "server.keep_checkpoints": 5,
        },
    )
    rt = LocalRuntime(from_dict(raw), tmp_path / "run")
    initial = rt.wb.initial_state()
    first = next(iter(initial))

    def crafted(inst, ctx):
        state = inst.state
        delta = {k: torch.full_like(v, 0.5) for k, v in state.items()}
        meta: dict[str, str] = {}
        if inst.cid == 1 or (inst.cid == 0 and inst.round == 2):
            delta[first] = delta[first].clone()
            delta[first].view(-1)[0] = float("nan")
        elif inst.cid == 2:
            delta[first] = torch.zeros(*state[first].shape[:-1], state[first].shape[-1] + 1)
        elif inst.cid == 3:
            delta["extra"] = torch.zeros(300_000)  # 1.2 MB
        elif inst.cid == 4:
            meta["fingerprint"] = "0123456789abcdef"
        return Update(cid=inst.cid, payload=delta, num_examples=10, metrics={}, meta=meta)

    rt.algo.local_update = crafted
    rt.run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    r1, r2 = rows[1], rows[2]
    assert r1["clients"] == [0] and r1["skipped"] is None
    reasons = {e["cid"]: e["reason"] for e in r1["rejected"]}
    assert sorted(reasons) == [1, 2, 3, 4]
    assert reasons[1] == f"nan in '{first}'"
    assert "shape" in reasons[2] and first in reasons[2]
    assert reasons[3].startswith("oversized: ") and "max_update_bytes 1000000" in reasons[3]
    assert reasons[4] == f"base-model fingerprint 0123456789abcdef differs from the server's {rt.wb.fingerprint}"
    # Round 1 aggregated only client 0: FedAvg of one delta of 0.5 everywhere.
    after1 = load_file(str(tmp_path / "run" / "checkpoints" / "round-000001" / "state.safetensors"))
    for k, t in initial.items():
        assert torch.equal(after1[k], t + 0.5), k
    # Round 2: every update rejected, so the round is skipped and the State is unchanged.
    assert r2["clients"] == [] and len(r2["rejected"]) == 5 and r2["skipped"]
    for k, t in after1.items():
        assert torch.equal(rt.final_state[k], t), k


def test_corrupted_bytes_are_a_decode_rejection(tmp_path):
    from conftest import tiny_config

    rt = LocalRuntime(from_dict(tiny_config(tmp_path)), tmp_path / "run")
    ref = rt.wb.initial_state()
    meta = {"cid": "0", "num_examples": "5", "fingerprint": rt.wb.fingerprint}
    from fedfm.codecs import CodecContext

    from fedfm.runtime.receive import receive_update

    chain = rt.loop.up
    data = chain.encode({k: torch.zeros_like(v) for k, v in ref.items()}, meta, CodecContext("up", 1, 0, ref)).data

    def receive(blob):
        return receive_update(chain, blob, 1, 0, ref, 0, None, rt.wb.fingerprint)

    update, reason = receive(data)
    assert reason is None and update.num_examples == 5
    update, reason = receive(data[: len(data) // 2])
    assert update is None and reason.startswith("decode failed: payload truncated")
    update, reason = receive(b"\xff" * 64)
    assert update is None and reason.startswith("decode failed")


def test_dtypes_floating_where_the_spec_is_and_exact_elsewhere():
    from fedfm.runtime.validate import check_dtypes

    ok = {"a": torch.ones(2, 3, dtype=torch.float64), "b": torch.ones(4, dtype=torch.bfloat16)}
    assert check_dtypes(ok, REF) is None  # another float dtype: accepted (the chain casts it)
    bad = {"a": torch.ones(2, 3), "b": torch.ones(4, dtype=torch.bool)}
    assert check_dtypes(bad, REF) == "dtype of 'b' is bool, expected a floating-point dtype (float32)"
    bad = {"a": torch.ones(2, 3, dtype=torch.int64), "b": torch.ones(4)}
    assert check_dtypes(bad, REF) == "dtype of 'a' is int64, expected a floating-point dtype (float32)"
    seeds = {"seeds": torch.zeros(3, dtype=torch.int64)}  # a non-floating spec (FedKSeed's seeds): exactly its dtype
    assert check_dtypes({"seeds": torch.zeros(3, dtype=torch.int64)}, seeds) is None
    assert check_dtypes({"seeds": torch.zeros(3, dtype=torch.int32)}, seeds) == "dtype of 'seeds' is int32, expected int64"
    assert check_dtypes({"seeds": torch.zeros(3)}, seeds) == "dtype of 'seeds' is float32, expected int64"
    assert check_update(bad, {"num_examples": "3"}, REF, None) == "dtype of 'a' is int64, expected a floating-point dtype (float32)"


def receive(stages: list, payload: dict, spec: dict = REF):
    """What the server makes of a client's payload sent through ``stages`` (client 3, round 1)."""
    from fedfm.codecs import CodecChain, CodecContext
    from fedfm.runtime.receive import receive_update

    chain = CodecChain.from_specs(stages, "codecs.up")
    data = chain.encode(payload, {"cid": "3", "num_examples": "5"}, CodecContext("up", 1, 3, spec)).data
    return receive_update(chain, data, 1, 3, spec, 0, None, None)


def test_a_bool_or_integer_update_is_rejected_not_cast():
    # a bool delta used to be cast to 1.0 everywhere and averaged in
    for dtype in (torch.bool, torch.int64, torch.uint8):
        update, reason = receive([], {"a": torch.ones(2, 3, dtype=dtype), "b": torch.ones(4)})
        assert update is None and reason == f"dtype of 'a' is {str(dtype)[6:]}, expected a floating-point dtype (float32)"
    # quantize leaves a non-floating tensor as it is: still refused after the chain
    update, reason = receive([{"name": "quantize", "bits": 8}], {"a": torch.ones(2, 3), "b": torch.ones(4, dtype=torch.int64)})
    assert update is None and reason == "dtype of 'b' is int64, expected a floating-point dtype (float32)"


def test_other_float_dtypes_are_cast_to_the_spec_and_lossy_codecs_still_pass():
    half = {"a": torch.full((2, 3), 0.5, dtype=torch.float16), "b": torch.full((4,), 0.25, dtype=torch.float64)}
    update, reason = receive([], half)
    assert reason is None and {k: v.dtype for k, v in update.payload.items()} == {"a": torch.float32, "b": torch.float32}
    assert update.payload["a"].tolist() == [[0.5] * 3] * 2 and update.payload["b"].tolist() == [0.25] * 4
    # a float64 value beyond float32's range becomes inf in the cast, and is refused as such
    update, reason = receive([], {"a": torch.full((2, 3), 1e300, dtype=torch.float64), "b": torch.ones(4)})
    assert update is None and reason == "inf in 'a'"
    x = {"a": torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.5, -0.5]]), "b": torch.tensor([1.0, 2.0, -3.0, 4.0])}
    for stages in ([{"name": "fp16"}], [{"name": "bf16"}], [{"name": "quantize", "bits": 8}],
                   [{"name": "topk", "fraction": 0.5}, {"name": "fp16"}]):
        update, reason = receive(stages, x)
        assert reason is None, (stages, reason)
        assert all(v.dtype == torch.float32 for v in update.payload.values()), stages
    # fp16 keeps these values exactly (halves and small integers)
    assert torch.equal(receive([{"name": "fp16"}], x)[0].payload["a"], x["a"])
    # a bf16 spec: quantize decodes to the dtype the client named (bf16), accepted as is
    bf = {k: v.to(torch.bfloat16) for k, v in x.items()}
    update, reason = receive([{"name": "quantize", "bits": 8}], bf, spec={k: torch.zeros_like(v) for k, v in bf.items()})
    assert reason is None and all(v.dtype == torch.bfloat16 for v in update.payload.values())
