"""Secure aggregation runs identically on Flower simulation and on the local backend:
the same phases, bytes and metrics, and a bit-identical final State (the unmasked sum is
exact, so fresh random keys in each run do not change it)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr")
pytest.importorskip("cryptography")

from fedfm.config import from_dict  # noqa: E402
from fedfm.runtime import LocalRuntime  # noqa: E402
from parity import assert_same_rows, comparable  # noqa: E402
from test_secagg_rounds import config  # noqa: E402


@pytest.mark.parametrize("clients,plus", [(3, {}), (4, {"neighbours": 2})], ids=["secagg", "secagg_plus"])
def test_secagg_on_flower_simulation_matches_local(tmp_path, clients, plus):
    """SecAgg, and SecAgg+ with 2 neighbours of 4 (each Flower client computes the graph
    from the roster it is sent)."""
    from fedfm.runtime.flower.simulation import run_flower_simulation

    def raw(**runtime):
        r = config(tmp_path, {"drop": [{"phase": "train", "cids": [1], "rounds": [2]}], **plus}, rounds=2,
                   **{"federation.clients": clients})
        r["runtime"] = {"progress": False, "threads": 1, **runtime}
        return r

    run_flower_simulation(from_dict(raw(backend="flower", flower={"num_cpus": 2})), tmp_path / "flower")
    LocalRuntime(from_dict(raw()), tmp_path / "local").run()
    a = load_file(str(tmp_path / "flower" / "final.safetensors"))
    b = load_file(str(tmp_path / "local" / "final.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    fl, lo = comparable(tmp_path / "flower" / "metrics.jsonl"), comparable(tmp_path / "local" / "metrics.jsonl")
    everyone = list(range(clients))
    assert [r["clients"] for r in lo[1:]] == [everyone, [c for c in everyone if c != 1]]
    assert set(lo[1]["phase_bytes"]) == {"secagg_advertise", "secagg_share", "secagg_route", "secagg_unmask"}
    for rows in (fl, lo):  # Flower reports a client's exception in its own (truncated) words
        for r in rows:
            for e in r.get("failed", []):
                error = e.pop("error")
                assert rows is fl or "client 1 dropped in phase train (simulated)" in error
    assert lo[2]["failed"] == [{"cid": 1}]
    assert_same_rows(fl, lo)
