"""The seeded directions and their replay give the same bytes at every x86 SIMD level.

ATen picks its vectorised kernels once per process from ``ATEN_CPU_CAPABILITY`` (or the
CPU), so each side runs in its own process: one forced to the scalar kernels
(``default``), one with the machine's own (AVX2 or AVX-512)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

CHILD = r"""
import hashlib, json, sys
import torch
from fedfm.aggregators.fedbpt import projection
from fedfm.aggregators.fedkseed_pro import draw_seeds
from fedfm.aggregators.zo_replay import CHUNK, param_noise, replay, round_delta, seed_pool
from fedfm.learners.zo_core import step_along

def h(t):
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()

out = {"capability": torch.backends.cpu.get_cpu_capability()}
g = torch.Generator().manual_seed(123)
out["randn_float32"] = h(torch.randn(4096, generator=g, dtype=torch.float32))  # the kernel-dependent draw
out["noise"] = h(param_noise((CHUNK + 4099,), 7, 3))  # crosses a chunk boundary
pool = seed_pool(0, 8)
shapes = {"a": torch.zeros(300, 7), "b": torch.zeros(5)}
row = torch.tensor([0.0, 0.3, 0.0, -1.7e-3, 0.0, 0.0123, 0.0, 2.5])
delta = round_delta(row, pool, shapes)
out["delta"] = {k: h(v) for k, v in delta.items()}
start = {"a": param_noise((300, 7), 1, 0), "b": param_noise((5,), 2, 1)}
out["replay"] = {k: h(v) for k, v in replay(start, torch.stack([row, row.flip(0)]), pool).items()}
out["projection"] = h(projection(40, 8, 0, 0.05))
probs = torch.softmax(torch.linspace(0, 1, 64, dtype=torch.float64), 0)
out["draw"] = h(draw_seeds(probs, 200, 0, 0, 3, 1))  # FedKSeed-Pro's server draw
model = torch.nn.Linear(300, 7)  # its own init draws float32 uniforms: set the weights from the seed
with torch.no_grad():
    model.weight.copy_(param_noise((7, 300), 4, 0))
    model.bias.copy_(param_noise((7,), 4, 1))
step_along(model, 9, -0.0371)
out["step"] = h(model.weight.detach())
print("RESULT " + json.dumps(out))
"""


def child(capability: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    env["PYTHONPATH"] = str(SRC)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_directions_and_replay_are_the_same_with_and_without_vector_kernels():
    scalar, native = child("default"), child(None)
    assert scalar["capability"] == "DEFAULT"
    if native["capability"] == "DEFAULT":
        pytest.skip("this CPU has no vectorised kernels to compare against")
    # the control: a float32 randn does differ between the two kernels
    assert scalar["randn_float32"] != native["randn_float32"]
    for key in ("noise", "delta", "replay", "projection", "draw", "step"):
        assert scalar[key] == native[key], key
