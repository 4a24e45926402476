"""Example data builders (preference pairs, templated instructions), the ``preferences``
source, and the greedy exact match of the causal LM task, all on hand-checkable inputs."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from fedfm.config import DataConfig
from fedfm.data.builders import INSTRUCT_TEMPLATES, continuation_pairs, instruction_rows, main
from fedfm.data.preferences import PreferenceOptions, preferences
from fedfm.tasks.causal_lm import IGNORE, exact_matches

FRAME = pd.DataFrame(
    {
        "text": ["a b c d e f", "g h i j k l", "m n o", "p q r s t u"],
        "group": ["x", "x", "y", "y"],
    }
)


def test_continuation_pairs_by_hand():
    pairs = continuation_pairs(FRAME, seed=0, prompt_words=2, answer_words=3)
    # "m n o" has 3 < 2 + 3 words: no pair. Passages of group x can only draw their
    # rejected answer from "p q r s t u" (words 2..4 = "r s t"); y's from x's passages.
    assert pairs["prompt"].tolist() == ["a b", "g h", "p q"]
    assert pairs["chosen"].tolist() == [" c d e", " i j k", " r s t"]
    assert pairs["rejected"].tolist()[:2] == [" r s t", " r s t"]
    assert pairs["rejected"].tolist()[2] in (" c d e", " i j k")
    assert pairs["group"].tolist() == ["x", "x", "y"]
    assert continuation_pairs(FRAME, seed=0, prompt_words=2, answer_words=3).equals(pairs)  # seeded
    with pytest.raises(ValueError, match="at least 2 groups"):
        continuation_pairs(FRAME.assign(group="x"), seed=0)


def test_instruction_rows_by_hand():
    frame = pd.DataFrame({"text": ["'Tis now the very witching time,\nof night", "Ay.", "O, that this too too solid flesh!"],
                          "group": ["a", "a", "b"]})
    rows = instruction_rows(frame, seed=0)
    # "Ay." has 1 < 4 words and is skipped; only the first line of a passage is used, and
    # answers lose their outer punctuation ("'Tis" -> "Tis", "time," -> "time", "O," -> "O")
    answers = {("first", 0): "Tis", ("last", 0): "time", ("first", 1): "O", ("last", 1): "flesh"}
    lines = ["'Tis now the very witching time,", "O, that this too too solid flesh!"]
    assert len(rows) == 2
    for i, row in rows.iterrows():
        assert row["response"] == answers[(row["task"], i)]
        assert row["instruction"] == INSTRUCT_TEMPLATES[row["task"]].format(line=lines[i])
    assert rows["group"].tolist() == ["a", "b"]


def test_preferences_source_reads_and_checks(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"q": "hi", "good": " yes", "bad": " no", "who": 3}) + "\n")
    cfg = DataConfig(path=str(path), group_column="who")
    df = preferences(cfg, PreferenceOptions(prompt_field="q", chosen_field="good", rejected_field="bad"))
    assert df.to_dict("records") == [{"prompt": "hi", "chosen": " yes", "rejected": " no", "text": " yes", "group": "3"}]
    with pytest.raises(ValueError, match="prompt_field: field 'prompt'"):
        preferences(cfg, PreferenceOptions())
    path.write_text(json.dumps({"prompt": "hi", "chosen": "x"}) + "\n" + json.dumps({"prompt": "hi", "chosen": "x", "rejected": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"data.options.rejected_field 'rejected' of .*p.jsonl: 1 row\(s\) have no rejected answer \(data rows 1,"):
        preferences(DataConfig(path=str(path), group_column=None), PreferenceOptions())
    path.write_text(json.dumps({"prompt": "hi", "chosen": "x", "rejected": "x"}) + "\n")
    with pytest.raises(ValueError, match="identical"):
        preferences(DataConfig(path=str(path), group_column=None), PreferenceOptions())


def test_builder_cli_writes_shakespeare_pairs(tmp_path):
    out = tmp_path / "pairs.jsonl"
    main(["pairs", "--out", str(out), "--plays", "macbeth", "--min-lines", "40"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) > 100 and len({r["group"] for r in rows}) >= 2
    assert all(len(r["prompt"].split()) == 8 and len(r["chosen"].split()) == 8 for r in rows)
    assert all(r["chosen"] != r["rejected"] for r in rows)


def test_exact_match_by_hand():
    # V = 5, stop token 4. Targets (labels shifted by one): row 0 labels 2, 3, 4(stop), 1;
    # its argmax predictions match 2, 3, 4 and miss the token after the stop, which is not
    # required: an exact match. Row 1 labels 2, 3 and the argmax misses 3: no match.
    # Row 2 has no labelled token and is not counted.
    logits = torch.zeros(3, 5, 5)
    labels = torch.tensor([[0, 2, 3, 4, 1], [0, 2, 3, IGNORE, IGNORE], [IGNORE] * 5])
    for t, tok in enumerate([2, 3, 4, 0]):
        logits[0, t, tok] = 5.0
    logits[1, 0, 2] = 5.0
    logits[1, 1, 1] = 5.0
    assert exact_matches(logits, labels, stop_id=4) == (1, 2)
    assert exact_matches(logits, labels, stop_id=None) == (0, 2)  # then the token after the stop counts
