"""End-to-end: 2 clients x 2 rounds on a tiny random model; the loss goes down.

Runs for both tasks (a tiny BERT classifier and a tiny Llama causal LM) with the same
runtime, tuner, codecs and aggregator: nothing task-specific outside tasks/.
"""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import tiny_config
from fedfm.config import from_dict
from fedfm.runtime import LocalRuntime
from tiny_llm import tiny_llm_config

TASKS = {
    "text_classification": (tiny_config, "accuracy"),
    "causal_lm": (tiny_llm_config, "perplexity"),
}


@pytest.mark.parametrize("task", list(TASKS))
def test_tiny_federated_run_lowers_loss(tmp_path, task):
    make_config, metric = TASKS[task]
    exp = from_dict(make_config(tmp_path))
    assert exp.model.task == task
    rt = LocalRuntime(exp, tmp_path / "run")
    summary = rt.run()
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for key in ("round", metric, "loss", "bytes_up", "bytes_down", "clients", "wall_s"):
        assert key in rows[1]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[1]["clients"] == [0, 1]
    final = load_file(str(tmp_path / "run" / "final.safetensors"))
    assert set(final) == set(rt.final_state)
    assert summary["peak_rss_mb"] > 0
    assert (tmp_path / "run" / "config.yaml").exists()
    if task == "causal_lm":
        assert rows[-1]["perplexity"] < rows[0]["perplexity"]
        generations = (tmp_path / "run" / "generations.jsonl").read_text().splitlines()
        assert len(generations) == 4 and all("generation" in json.loads(g) for g in generations)
