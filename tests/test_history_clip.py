"""history_clip (ClippedClustering's tau over every norm seen, Li, Ngai and Voigt 2023) by
hand over two rounds, the paper's ClippedClustering (history_clip + clip: none) in a run,
and the double clipping refused."""

from __future__ import annotations

import json

import pytest
import torch

from fedfm.aggregators.clipped_clustering import ClippedClusteringParams, clipped_clustering
from fedfm.aggregators.history_clip import HistoryClip
from fedfm.config import ConfigError, from_dict
from fedfm.core.types import Update
from fedfm.runtime import LocalRuntime

from conftest import tiny_config


def updates(*norms: float) -> list[Update]:
    return [Update(cid=i, payload={"w": torch.tensor([0.6 * n, 0.8 * n])}, num_examples=1) for i, n in enumerate(norms)]


def test_tau_is_the_median_of_every_norm_seen_by_hand():
    step = HistoryClip()
    # round 1: norms 1, 2, 3 -> tau = 2; the norm-3 update becomes (1.2, 1.6)
    out, state, metrics = step(updates(1.0, 2.0, 3.0), None, {})
    assert metrics == {"tau": pytest.approx(2.0), "clipped": 1, "seen": 3}  # float32 rows: 2 to 1e-7
    assert torch.allclose(out[2].payload["w"], torch.tensor([1.2, 1.6])) and torch.equal(out[0].payload["w"], torch.tensor([0.6, 0.8]))
    assert state["norms"].tolist() == pytest.approx([1.0, 2.0, 3.0])
    # round 2: norms 4, 5 -> history 1..5, tau = 3 (this round's median alone would be 4.5)
    out, state, metrics = step(updates(4.0, 5.0), None, state)
    assert metrics == {"tau": pytest.approx(3.0), "clipped": 2, "seen": 5}
    assert all(torch.allclose(u.payload["w"], torch.tensor([1.8, 2.4])) for u in out)


def test_clip_none_clusters_the_updates_as_they_come():
    # the opposite row is alone in its cosine cluster; with clip: none the mean of the other
    # three is taken as they came: ((1 + 2 + 1.5) / 3, 0.1 / 3). (clip: round would first scale
    # (2, 0) and (-4, -4) down to the median norm, 1.5017)
    state = {"w": torch.zeros(2)}
    deltas = [{"w": torch.tensor(v)} for v in ([1.0, 0.0], [2.0, 0.0], [1.5, 0.1], [-4.0, -4.0])]
    out = clipped_clustering(state, deltas, [1] * 4, ClippedClusteringParams(clip="none"))
    assert torch.allclose(out["w"], torch.tensor([1.5, 0.1 / 3]))  # the mean of the first three, unclipped


def test_the_papers_clipped_clustering_in_a_run(tmp_path):
    raw = tiny_config(tmp_path, **{"federation.clients": 3, "aggregator": {"rule": "clipped_clustering", "clip": "none"}})
    raw["server_steps"] = [{"name": "history_clip"}]
    LocalRuntime(from_dict(raw), tmp_path / "run").run()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["history_clip.seen"] for r in rows[1:]] == [3, 6]
    assert rows[1]["history_clip.clipped"] == 1  # 3 norms: the one above the median


def test_clipping_twice_is_refused(tmp_path):
    raw = tiny_config(tmp_path, **{"federation.clients": 3, "aggregator": {"rule": "clipped_clustering"}})
    raw["server_steps"] = [{"name": "history_clip"}]
    with pytest.raises(ConfigError, match="clipped_clustering with clip: round would clip them again"):
        from_dict(raw)
