"""The parity job every transport must run identically (tests/test_flower_*.py).

SCAFFOLD (server control variate broadcast as a declared group), top-k 10% with error
feedback + 8-bit quantization up, the downlink ``delta`` stage, 25% simulated dropout,
and client 1 in a role whose middleware sends a zero example count, so that its update is
rejected by the server every round it is sampled.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import tiny_config

WALL = ("wall_s",)


def parity_config(tmp_path, **runtime) -> dict:
    raw = tiny_config(
        tmp_path,
        rounds=3,
        **{
            "federation.clients": 4,
            "federation.roles": [{"name": "broken", "cids": [1], "middleware": [{"name": "corrupt", "kind": "zero_weight"}]}],
            "faults.dropout": 0.25,
            "learner.name": "scaffold",
            "codecs.up": [{"topk": 0.1, "error_feedback": True}, {"quantize": 8}],
            "codecs.down": [{"delta": True}],
            "train.epochs": 1,
        },
    )
    raw["runtime"] = {"progress": False, "threads": 1, **runtime}
    return raw


def comparable(path: Path) -> list[dict]:
    """Every metrics.jsonl field except wall times."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in WALL} for r in rows]


def differences(a: list[dict], b: list[dict]) -> list[str]:
    """Every (round, field) where two comparable metrics files differ, with both values."""
    out = [f"{len(a)} rows against {len(b)}"] if len(a) != len(b) else []
    for ra, rb in zip(a, b):
        for k in sorted(set(ra) | set(rb)):
            if ra.get(k) != rb.get(k):
                out.append(f"round {ra.get('round')} {k}: {ra.get(k)!r} != {rb.get(k)!r}")
    return out


def assert_same_rows(a: list[dict], b: list[dict]) -> None:
    """``a == b``, or an AssertionError that lists every differing (round, field)."""
    found = differences(a, b)
    assert not found, "metrics differ:\n" + "\n".join(found)


def check_job_exercised(rows: list[dict]) -> None:
    """The job really went through every path it is meant to compare."""
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert any(r.get("dropped") for r in rows[1:]), "no client dropped: the dropout path is not compared"
    rejected = [e for r in rows[1:] for e in r.get("rejected", [])]
    assert rejected and all(e["cid"] == 1 and "num_examples 0" in e["reason"] for e in rejected)
    assert all(r["codec_bytes"]["up"].get("topk", 0) > 0 for r in rows[1:] if r["clients"])
    assert any(r["codec_bytes"]["down"].get("delta") for r in rows[1:])
