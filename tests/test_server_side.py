"""The server-only workbench (Flower's SuperLink side) keeps the test set and nothing of a
client's examples, and evaluates exactly as the full one does."""

from __future__ import annotations

import pytest

from fedfm.config import from_dict
from fedfm.runtime import Workbench


def test_server_only_workbench_holds_test_rows_only(tiny):
    exp = from_dict(tiny)
    full = Workbench(exp)
    server = Workbench(exp, server_only=True)
    fed = server.federation
    test = set(fed.test_indices.tolist())
    client_rows = [i for c in fed.clients for i in c.indices]
    assert client_rows and not test & set(client_rows)
    # every client row lost its text, every test row kept it; labels stay everywhere
    assert fed.frame["text"].iloc[client_rows].isna().all()
    assert fed.frame["text"].iloc[sorted(test)].notna().all()
    assert fed.frame["label"].iloc[client_rows].equals(full.federation.frame["label"].iloc[client_rows])
    # the same partition and the same test evaluation as the full workbench
    assert [c.indices for c in fed.clients] == [c.indices for c in full.federation.clients]
    state = full.initial_state()
    assert server.evaluate(state) == full.evaluate(state)
    with pytest.raises(RuntimeError, match="holds the test set only"):
        server.examples(0)
