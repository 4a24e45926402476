"""Personal soft prompts beside a shared LoRA: the prompt stays home, LoRA and head travel."""

from __future__ import annotations

import pytest
import torch

from conftest import record_replies
from fedfm.codecs.serialize import from_bytes
from fedfm.config import ConfigError, from_dict
from fedfm.peft.personal_prompt import insert_prompt
from fedfm.runtime import LocalRuntime
from fedfm.runtime.client import LOCAL_KEY


def test_insert_prompt_after_the_first_token():
    embeds = torch.arange(2 * 3 * 1, dtype=torch.float32).reshape(2, 3, 1)  # rows [0,1,2], [3,4,5]
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    prompt = torch.tensor([[10.0], [20.0]])
    out, m = insert_prompt(embeds, mask, prompt)
    assert out[:, :, 0].tolist() == [[0, 10, 20, 1, 2], [3, 10, 20, 4, 5]]
    assert m.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]


def _cfg(tiny):
    tiny["peft"] = {
        "method": "personal_prompt",
        "num_virtual_tokens": 4,
        "shared": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        "local": ["personal_prompt.*"],
    }
    return tiny


def test_personal_prompt_stays_on_the_client(tmp_path, tiny):
    rt = LocalRuntime(from_dict(_cfg(tiny), overrides=["rounds=1", "train.steps=2"]), tmp_path / "run")
    sent = record_replies(rt)
    assert rt.wb.template["personal_prompt.embedding"].shape == (4, 32)
    rt.run()
    # By hand: LoRA r=4 on query, value of 2 layers = 1024 float32 (4096 bytes) + the shared
    # classifier 2x32 + 2 = 66 float32 (264 bytes) = 4360 bytes; the 4x32 prompt (512 bytes) stays.
    assert len(sent) == 2
    for data in sent:
        tensors = from_bytes(data).tensors
        assert "personal_prompt.embedding" not in tensors
        assert sum(t.numel() * 4 for t in tensors.values()) == 4360
    prompts = [rt.store.get(c, LOCAL_KEY)["personal_prompt.embedding"] for c in (0, 1)]
    init = rt.wb.template["personal_prompt.embedding"]
    assert not torch.equal(prompts[0], init) and not torch.equal(prompts[0], prompts[1])


def test_prompt_based_shared_tuner_is_refused(tmp_path, tiny):
    tiny = _cfg(tiny)
    tiny["peft"]["shared"] = {"method": "prompt_tuning"}
    with pytest.raises(ConfigError, match="prompt-based"):
        from_dict(tiny)
