"""A local run killed mid-round and resumed ends bit-identical to an uninterrupted one when
the state it must carry is the server optimizer's (FedAdam's first and second moments),
FedDyn's (the server's h and each client's previous gradient), the clients' error-feedback
residuals and the downlink delta references.

Every client waits 4 s before training in round 2 (the ``delay`` middleware), so the kill
lands after the first client staged its round-2 writes and before the round's checkpoint (tests/test_flower_resume.py does the
same on Flower with SCAFFOLD).
"""

from __future__ import annotations

import json

import torch
import yaml
from safetensors.torch import load_file

from fedfm.config import from_dict
from fedfm.runtime import LocalRuntime
from fedfm.runtime.checkpoint import Checkpointer
from parity import comparable, parity_config
from test_flower_resume import fedfm, kill_once_staged


def stateful_job(tmp_path) -> dict:
    raw = parity_config(tmp_path)
    raw["learner"] = {"name": "feddyn", "alpha": 0.01}
    raw["server_optimizer"] = {"name": "fedadam", "lr": 0.03, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    raw["federation"]["roles"] = [{"name": "slow", "fraction": 1.0, "middleware": [{"name": "delay", "seconds": 4, "rounds": [2]}]}]
    return raw


def test_killed_mid_round_resumes_fedadam_and_feddyn_bit_identically(tmp_path):
    raw = stateful_job(tmp_path)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "killed"
    proc = fedfm(cfg, out)
    kill_once_staged(proc, out, "*/r2a0")
    assert Checkpointer(out).rounds() == [1], "the kill did not land inside round 2"
    # the checkpoint really holds the state this test is about
    groups = {k.split("/", 1)[0] for k in load_file(str(out / "checkpoints" / "round-000001" / "algorithm.safetensors"))}
    assert groups == {"opt.m", "opt.v", "feddyn.h"}, groups

    resumed = fedfm(cfg, out, "--resume")
    log = resumed.communicate(timeout=900)[0].decode()
    assert resumed.returncode == 0, log[-3000:]

    threads = torch.get_num_threads()
    try:
        straight = LocalRuntime(from_dict(raw), tmp_path / "straight")
        straight.run()
    finally:
        torch.set_num_threads(threads)
    final = load_file(str(out / "final.safetensors"))
    assert set(final) == set(straight.final_state)
    for name, t in straight.final_state.items():
        assert torch.equal(final[name], t), name
    drop = ("wall_s",)
    a = [{k: v for k, v in r.items() if k not in drop} for r in comparable(out / "metrics.jsonl")]
    b = [{k: v for k, v in r.items() if k not in drop} for r in comparable(tmp_path / "straight" / "metrics.jsonl")]
    assert a == b
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 1
