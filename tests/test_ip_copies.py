"""client_watermark in the round loop: each of 8 tiny clients receives its own watermarked
copy (through the delta downlink), tracing names the client a received copy came from, the
copy keeps the owner's key, the global model carries no client key, and a resumed run
sends the same copies."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import tiny_config
from fedfm.cli import app
from fedfm.config import ConfigError, from_dict
from fedfm.core.types import MODEL, unflatten_groups
from fedfm.ip import TriggerSpec, trace, trigger_set, verdict
from fedfm.ip.copies import copy_of
from fedfm.ip.loading import build_base
from fedfm.peft import set_state
from fedfm.runtime import LocalRuntime
from fedfm.runtime.algorithm import build_algorithm
from fedfm.runtime.store import ClientStore

MASTER = "federation-master-key"
OWNER = "owner-key"
CLIENTS = 8
# 16 triggers per client, 4 labels: a copy answers its own set 16/16 (p = 4**-16 = 2.3e-10)
# and the other clients' sets near chance (1/4 of 16 = 4). The tiny model learns the
# triggers through LoRA and its head together (freeze: []).
STEP = {"name": "client_watermark", "key": MASTER, "owner_key": OWNER, "trigger_size": 16, "trigger_length": 8,
        "threshold": 1.0, "max_steps": 300, "lr": 0.03, "freeze": []}
SPEC = TriggerSpec("text_classification", size=16, length=8, num_labels=4)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def copies_config(tmp_path, **over):
    return tiny_config(tmp_path, **{
        "model.num_labels": 4, "federation.clients": CLIENTS, "server_steps": [dict(STEP)], "train.epochs": 1,
        "codecs.down": [{"delta": True}], "server.keep_checkpoints": 2, **over})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("copies")
    raw = copies_config(tmp)
    out = tmp / "run"
    LocalRuntime(from_dict(raw), out).run()
    return tmp, raw, out


def round_state(out, rnd):
    d = out / "checkpoints" / f"round-{rnd:06d}"
    return {MODEL: load_file(str(d / "state.safetensors")), **unflatten_groups(load_file(str(d / "algorithm.safetensors")))}


def test_each_client_receives_its_own_copy_and_is_traced(run):
    tmp, raw, out = run
    exp = from_dict(raw)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows[1:]:
        # every copy answers at least 30 of its 32 triggers (16 its own, 16 the owner's)
        assert row["client_watermark.min_accuracy"] >= 30 / 32, row
        assert row["client_watermark.seconds_per_client"] > 0
    # Same shapes for every client, lossless delta: the downlink bytes of rounds 1 (full
    # State, flag 0) and 2 (a per-client difference, flag 1) are the same size.
    assert rows[1]["bytes_down"] == rows[2]["bytes_down"] > 0

    base, template = build_base(exp)
    after1 = round_state(out, 1)
    group = next(g for g in after1 if g.endswith("client_watermark"))
    assert len(after1[group]) == CLIENTS * len(after1[MODEL])  # one offset per client and shared name
    algo = build_algorithm(exp)
    owner = trigger_set(OWNER, SPEC, base.tokenizer)
    received = {}
    clients = ClientStore(out / "clients")
    for cid in range(CLIENTS):
        # What client cid rebuilt from round 2's delta broadcast (its store's write of round
        # 2, settled as the server's next message would) is round 1's global model plus its
        # own offset ...
        clients.settle(cid, "r2a0", True)
        got = clients.get(cid, "down_last")
        mirror = load_file(str(out / "server" / "mirror" / str(cid) / "down_last.safetensors"))
        want = copy_of(cid, after1[MODEL], after1[group])
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], mirror[k])  # the server's mirror of the client's reconstruction
            assert torch.allclose(got[k], want[k], atol=1e-6)
        # ... which configure issues, and which names client cid among the 8.
        issued = algo.configure(3, after1, [c for c in _clients(exp)])[cid].state
        assert all(torch.equal(issued[k], want[k]) for k in want)
        full = {**template, **got}
        found = trace(base, full, MASTER, range(CLIENTS), SPEC)
        # >= 14 of 16: p = P[Binomial(16, 1/4) >= 14] = 2.6e-7 at most; the best of 8 keys: 8x that
        assert found.suspect == cid and found.verdicts[cid].hits >= 14
        assert found.p_raw < 3e-7 and found.p_value == pytest.approx(8 * found.p_raw)
        assert max(v.hits for c, v in found.verdicts.items() if c != cid) <= 10
        set_state(base.model, full)
        assert verdict(base.task, SPEC, base.model, base.tokenizer, owner).hits >= 14  # the owner's key too
        received[cid] = got
    k = next(iter(received[0]))
    assert not torch.equal(received[0][k], received[1][k])
    # The command line reads the trigger spec of the run's client_watermark step (16 x 8).
    leaked = out / "server" / "mirror" / "5" / "down_last.safetensors"
    done = CliRunner().invoke(app, ["watermark", "trace", str(leaked), "--config", str(out / "config.yaml"),
                                    "--key", MASTER, "--clients", str(CLIENTS)])
    assert done.exit_code == 0, done.output
    assert "suspect: client 5" in done.output
    # The global model the server keeps (and evaluates, and writes) carries no client key.
    glob = {**template, **load_file(str(out / "final.safetensors"))}
    assert trace(base, glob, MASTER, range(CLIENTS), SPEC).p_value > 1e-3


def test_resumed_run_sends_the_same_copies(run, tmp_path):
    _, raw, out = run
    one = tmp_path / "one"
    LocalRuntime(from_dict({**raw, "rounds": 1}), one).run()
    LocalRuntime(from_dict(raw), one, resume=True).run()  # round 2 from round 1's checkpoint
    for cid in (0, 5):
        a = load_file(str(out / "server" / "mirror" / str(cid) / "down_last.safetensors"))
        b = load_file(str(one / "server" / "mirror" / str(cid) / "down_last.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_per_client_shapes_are_refused(tmp_path):
    raw = copies_config(tmp_path, **{"learner": {"name": "hetlora"}})
    with pytest.raises(ConfigError, match="client_watermark.*own shape"):
        from_dict(raw)


def _clients(exp):
    from fedfm.core.types import ClientSpec

    return [ClientSpec(cid=c, indices=[]) for c in range(exp.federation.clients)]


def test_the_threshold_holds_for_each_part_of_the_trigger_list(tmp_path):
    from fedfm.ip import EmbedSettings, embed
    from fedfm.ip.verify import count_hits

    exp = from_dict(tiny_config(tmp_path, **{"model.num_labels": 4}))
    base, template = build_base(exp)
    own = trigger_set("client", SPEC, base.tokenizer)
    owner = trigger_set(OWNER, SPEC, base.tokenizer)
    set_state(base.model, template)
    h_own = count_hits(base.task, SPEC.task, base.model, base.tokenizer, own)[0]
    h_owner = count_hits(base.task, SPEC.task, base.model, base.tokenizer, owner)[0]

    def start(parts):  # max_steps 0: the accuracy of the starting model, as embed measures it
        return embed(base.model, base.task, SPEC.task, base.tokenizer, template, own + owner,
                     EmbedSettings(1.0, 0, 0.01, 8, (), parts=parts), seed=0).accuracy

    # pooled: (h_own + h_owner) / 32; per part: the lower of h_own / 16 and h_owner / 16
    assert start(()) == pytest.approx((h_own + h_owner) / 32)
    assert start((16, 16)) == pytest.approx(min(h_own, h_owner) / 16)
    with pytest.raises(ValueError, match=r"parts \[16, 8\] sum to 24, not the 32 triggers"):
        start((16, 8))


def test_copies_only_after_the_last_round_leave_training_alone_and_are_written_by_the_cli(tmp_path):
    step = {**STEP, "rounds": "last"}
    raw = copies_config(tmp_path, **{"server_steps": [step], "codecs.down": []})
    out, plain = tmp_path / "run", tmp_path / "plain"
    LocalRuntime(from_dict(raw), out).run()
    LocalRuntime(from_dict({**raw, "server_steps": []}), plain).run()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["client_watermark.steps"] == 0 and rows[2]["client_watermark.steps"] > 0  # 2 rounds: the last only
    # the federation trained exactly as without the step: same global model, bit for bit
    final, final_plain = load_file(str(out / "final.safetensors")), load_file(str(plain / "final.safetensors"))
    assert all(torch.equal(final[k], final_plain[k]) for k in final_plain)
    # client 5's final copy, written by the command line, is traced to client 5
    path = tmp_path / "copy5.safetensors"
    done = CliRunner().invoke(app, ["watermark", "copy", str(out), "--client", "5", "--out", str(path)])
    assert done.exit_code == 0, done.output
    exp = from_dict(raw)
    base, template = build_base(exp)
    found = trace(base, {**template, **load_file(str(path))}, MASTER, range(CLIENTS), SPEC)
    assert found.suspect == 5 and found.p_raw < 3e-7 and found.p_value < 8 * 3e-7
    # bad input: an existing file is kept, an unknown client and a run without the step are named
    before = path.read_bytes()
    done = CliRunner().invoke(app, ["watermark", "copy", str(out), "--client", "2", "--out", str(path)])
    assert done.exit_code == 2 and "exists; pass --overwrite" in done.output and path.read_bytes() == before
    done = CliRunner().invoke(app, ["watermark", "copy", str(out), "--client", "99", "--out", str(tmp_path / "x.safetensors")])
    assert done.exit_code == 2 and "no copy for client 99" in done.output and "clients 0..7" in done.output
    done = CliRunner().invoke(app, ["watermark", "copy", str(plain), "--client", "0", "--out", str(tmp_path / "y.safetensors")])
    assert done.exit_code == 2 and "no client_watermark offsets" in done.output
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()
