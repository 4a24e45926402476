"""The local runtime keeps one model instance whatever the number of clients."""

from __future__ import annotations

import gc

from fedfm.config import from_dict
from fedfm.runtime import LocalRuntime


def test_fifty_clients_one_model(tmp_path, tiny, model_builds):
    tiny["federation"] = {"clients": 50, "partitioner": {"name": "iid"}, "test_examples": 40}
    tiny["data"]["group_column"] = None
    tiny["train"] = {"lr": 0.01, "batch_size": 4, "steps": 1}
    exp = from_dict(tiny, overrides=["rounds=1"])
    rt = LocalRuntime(exp, tmp_path / "run")
    rt.run()
    assert len(rt.wb.clients) == 50
    assert model_builds["models"] == 1
    model_cls = type(rt.wb.model.get_base_model())
    gc.collect()
    alive = [o for o in gc.get_objects() if type(o) is model_cls]
    assert len(alive) == 1
