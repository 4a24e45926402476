"""FLASH discovers in the first round the server aggregates, kept in the server state."""

from __future__ import annotations

import json

import torch
from conftest import tiny_config, register_failing_middleware
from safetensors.torch import load_file

from fedfm.aggregators.flash import SCHEDULE, FlashServer
from fedfm.config import from_dict
from fedfm.core.types import MODEL, ClientSpec
from fedfm.learners.flash import FlashParams
from fedfm.runtime.local import LocalRuntime


register_failing_middleware("test_flash_refuse_round_one", lambda ctx: ctx.round == 1, "no training in round 1")


def _raw(tmp_path, **over) -> dict:
    learner = {"name": "flash", "prune": ["*encoder*"], "density": 0.2, **over.pop("learner", {})}
    refuse = [{"name": "all", "count": 2, "middleware": [{"name": "test_flash_refuse_round_one"}]}]
    return tiny_config(tmp_path, **{"peft": {"method": "full"}, "learner": learner, "rounds": 3, "train.epochs": 1,
                                    "federation.roles": refuse, "federation.on_too_few": "skip", "server.keep_checkpoints": 5,
                                    "runtime": {"progress": False, "threads": 1}, **over})


def _rows(out) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in open(out / "metrics.jsonl")]


def _discovered(out, rnd: int) -> list[int]:
    groups = load_file(str(out / "checkpoints" / f"round-{rnd:06d}" / "algorithm.safetensors"))
    return groups[f"{SCHEDULE}/discovered"].tolist()


def test_the_schedule_counts_from_the_round_that_discovered():
    server = FlashServer(FlashParams(density=0.5, variant="jmwst", update_every=2), 2)
    model = {"enc.w": torch.ones(2, 2)}
    ss = {MODEL: model, **server.init(model)}
    assert [server.instruction(r, ss, ClientSpec(0, []), 0).config["discover"] for r in (1, 2, 5)] == [True] * 3
    after = {**ss, SCHEDULE: {"discovered": torch.tensor([2])}}  # round 1 aggregated nothing
    # rounds after discovery 1, 2, 3, 4 are rounds 3..6: regrow in 4 and 6
    assert [server.instruction(r, after, ClientSpec(0, []), 0).config for r in (3, 4, 6)] == [
        {"discover": False, "regrow": False}, {"discover": False, "regrow": True}, {"discover": False, "regrow": True}]
    assert [server.regrows(r, 2) for r in range(1, 7)] == [False, False, False, True, False, True]


def test_a_skipped_first_round_discovers_in_round_two_then_trains(tmp_path):
    out = tmp_path / "run"
    LocalRuntime(from_dict(_raw(tmp_path)), out).run()
    rows = _rows(out)
    assert rows[1]["skipped"] and rows[1]["clients"] == [] and "flash.density" not in rows[1]
    assert [f["error"] for f in rows[1]["failed"]] == ["RuntimeError: no training in round 1"] * 2
    assert _discovered(out, 1) == [0] and _discovered(out, 2) == [2] and _discovered(out, 3) == [2]
    assert [rows[r]["flash.discovered"] for r in (2, 3)] == [2, 2]  # in metrics.jsonl too
    # round 2 sends masks (1 bit per prunable entry: 2,048 bytes, + headers, per client), round 3 deltas
    assert 2048 * 2 < rows[2]["bytes_up"] < rows[3]["bytes_up"] / 100
    assert rows[2]["flash.density"] == rows[3]["flash.density"] and 0 <= rows[3]["flash.kept"] - 0.2 * 16384 < 12
    assert rows[2]["accuracy"] == rows[0]["accuracy"] and rows[3]["train_loss"] is not None


def test_resumed_after_a_late_discovery_ends_bit_identical(tmp_path):
    """JMWST with update_every 2 re-picks in round 4 (2 rounds after round 2's discovery),
    which the resumed run knows from the checkpointed schedule alone."""
    jmwst = {"learner": {"variant": "jmwst", "update_every": 2, "pick": "magnitude"}}
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    LocalRuntime(from_dict(_raw(tmp_path, rounds=4, **jmwst)), straight).run()
    LocalRuntime(from_dict(_raw(tmp_path, rounds=2, **jmwst)), cut).run()
    LocalRuntime(from_dict(_raw(tmp_path, rounds=4, **jmwst)), cut, resume=True).run()
    a, b = _rows(straight), _rows(cut)
    assert a == b
    assert a[4]["bytes_up"] > a[3]["bytes_up"]  # round 4 re-picks: deltas and masks
    fa, fb = load_file(str(straight / "final.safetensors")), load_file(str(cut / "final.safetensors"))
    assert set(fa) == set(fb) and all(torch.equal(fa[k], fb[k]) for k in fa)
