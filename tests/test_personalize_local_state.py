"""Local state (peft.local) never leaves the client: only the shared part is on the wire."""

from __future__ import annotations

import json
import struct

import torch

from conftest import record_replies
from fedfm.codecs.serialize import from_bytes
from fedfm.config import from_dict
from fedfm.runtime import LocalRuntime
from fedfm.runtime.client import LOCAL_KEY


def test_local_head_stays_on_the_client(tmp_path, tiny):
    tiny["peft"]["local"] = ["*classifier.*"]
    exp = from_dict(tiny, overrides=["rounds=1", "train.steps=2"])
    rt = LocalRuntime(exp, tmp_path / "run")
    sent = record_replies(rt)
    rt.run()
    assert len(sent) == 2  # one training reply per client (no client eval in this run)
    # By hand: tiny BERT (hidden 32, 2 layers), LoRA r=4 on query and value:
    # per layer 2 modules x (A: 4x32 + B: 32x4) = 2 x 256 = 512 values; 2 layers = 1024 float32
    # values = 4096 bytes. The classifier (2x32 weight + 2 bias = 66 values, 264 bytes) stays home.
    for data in sent:
        payload = from_bytes(data)
        assert not any("classifier" in k for k in payload.tensors)
        assert len(payload.tensors) == 8
        assert sum(t.numel() * t.element_size() for t in payload.tensors.values()) == 4096
        (header,) = struct.unpack("<Q", data[:8])
        assert len(data) == 8 + header + 4096  # safetensors: length, JSON header, tensor bytes
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["bytes_up"] == sum(len(d) for d in sent)
    assert not any("classifier" in k for k in rt.loop.server_state["model"])
    # each client kept its own trained head in its store, and the two differ
    heads = [rt.store.get(cid, LOCAL_KEY) for cid in (0, 1)]
    init = rt.wb.template
    for head in heads:
        assert set(head) == {k for k in init if "classifier" in k}
        assert any(not torch.equal(head[k], init[k]) for k in head)
    k = next(iter(heads[0]))
    assert not torch.equal(heads[0][k], heads[1][k])
