"""User data a demanding user may bring: float labels, tiny pools, skewed partitions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedfm.config import FederationConfig
from fedfm.core.types import ClientSpec
from fedfm.data.federated import Federation, build_federation
from fedfm.data.labels import single_class
from fedfm.data.sources import encode_labels


def test_whole_numbers_written_as_floats_are_class_ids():
    # as a CSV column that once held a blank is written back: 1.0, 0.0, ...
    assert encode_labels(pd.Series([1.0, 0.0, 2.0, 10.0]), None) == ([1, 0, 2, 10], None)


def test_other_numbers_are_names_in_numeric_order():
    # as text, "10.5" would sort before "2.5"
    assert encode_labels(pd.Series([0.5, 10.5, 2.5, 0.5]), None) == ([0, 2, 1, 0], ["0.5", "2.5", "10.5"])
    assert encode_labels(pd.Series([float("inf"), 1.0]), None) == ([1, 0], ["1.0", "inf"])


def test_float_labels_from_a_csv_file(tmp_path):
    from fedfm.data.sources import local_file

    path = tmp_path / "f.csv"
    path.write_text("text,label\na,1.0\nb,0.0\nc,1.0\n")

    class Cfg:
        path, format, encoding = str(tmp_path / "f.csv"), None, "utf-8"
        text_column, label_column, group_column, labels = "text", "label", None, None

    frame = local_file(Cfg, None)
    assert frame["label"].tolist() == [1, 0, 1]
    assert "label_names" not in frame.attrs


def _two_clients():
    frame = pd.DataFrame({"text": list("abcdef"), "label": [0, 0, 0, 1, 0, 1]})
    clients = [ClientSpec(cid=0, indices=[0, 1]), ClientSpec(cid=1, indices=[2, 3])]
    return Federation(frame=frame, clients=clients, test_indices=np.array([4, 5]))


def test_one_class_client_hint_follows_the_partitioner():
    fed = _two_clients()  # client 0 holds label 0 only
    (natural,) = single_class(fed, ["0", "1"], "natural")
    assert natural.startswith("1 of 2 clients hold one class only: client 0 (label 0).")
    assert "subsample: random" in natural
    (skewed,) = single_class(fed, ["0", "1"], "dirichlet")
    assert "subsample" not in skewed
    assert "label skew of federation.partitioner 'dirichlet'" in skewed


def _frame(n_groups: int, per_group: int) -> pd.DataFrame:
    rows = [{"text": f"t{g}-{i}", "label": i % 2, "group": f"g{g}"} for g in range(n_groups) for i in range(per_group)]
    return pd.DataFrame(rows)


def test_test_set_taking_every_group_names_the_counts():
    # 3 groups of 4 rows; 9 test rows need 3 whole groups: all 12 rows, none left to train
    cfg = FederationConfig(clients=1, partitioner={"name": "iid"}, test_examples=9)
    with pytest.raises(ValueError, match=r"test_examples=9: .* took all 3 groups \(12 rows\)"):
        build_federation(_frame(3, 4), cfg, 0)


def test_more_shards_than_examples_is_refused():
    # 12 rows, 1 test group of 4 held out: a pool of 8; 2 clients x 5 shards = 10 > 8
    cfg = FederationConfig(clients=2, partitioner={"name": "shards", "shards_per_client": 5}, test_examples=4)
    with pytest.raises(ValueError, match=r"shards_per_client=5: 2 clients x 5 = 10 shards, but the training pool holds 8"):
        build_federation(_frame(3, 4), cfg, 0)
    cfg = FederationConfig(clients=2, partitioner={"name": "shards", "shards_per_client": 4}, test_examples=4)
    fed = build_federation(_frame(3, 4), cfg, 0)
    assert sorted(len(c.indices) for c in fed.clients) == [4, 4]
