"""fedfm run says when rounds were skipped, with the first client failure: a config error
that fails every client does not pass as a finished run."""

from __future__ import annotations

import yaml
from conftest import invoke, tiny_config, register_failing_middleware



register_failing_middleware("test_cli_always_fail", lambda ctx: ctx.round == 1 or ctx.cid == 0, "cannot train")


def test_run_warns_of_skipped_rounds_with_the_first_failure(tmp_path, monkeypatch):
    raw = tiny_config(tmp_path, rounds=2, **{
        "train.steps": 1, "federation.min_clients": 2, "federation.max_retries": 0,
        "federation.roles": [{"name": "all", "count": 2, "middleware": [{"name": "test_cli_always_fail"}]}]})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    result, out = invoke(monkeypatch, "run", str(cfg), "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, out
    assert ("warning: every round was skipped: no update was aggregated and the final model is the initial one; "
            "first failure: client 0: RuntimeError: cannot train (metrics.jsonl: skipped, failed)") in out
    # min_clients 1: round 1 fails everywhere, round 2 aggregates client 1
    result, out = invoke(monkeypatch, "run", str(cfg), "--out", str(tmp_path / "run2"), "-o", "federation.min_clients=1")
    assert result.exit_code == 0, out
    assert "warning: 1 of 2 rounds skipped ([1]); first failure: client 0: RuntimeError: cannot train" in out
