"""Who may join a deployment (runtime/flower/node_keys.py).

By hand: the admission rule on a constructed SuperLink view (no Flower needed). On
loopback with TLS: a SuperLink with Flower's SuperNode authentication, the public keys of
clients 0, 1 and 2 registered with ``flwr supernode register`` and bound in
``runtime.flower.nodes``; the nodes of clients 0 and 1 train; the node holding client 2's
key claims client 0 (impersonation: refused by fedfm, recorded in nodes.jsonl, so client 2
fails every round with "no admitted node"); a node with a key nobody registered is refused
by Flower at activation (SuperLink log) and never reaches the ServerApp.
"""

from __future__ import annotations

import json

import pytest

from conftest import tiny_config
from fedfm.config import ConfigError, from_dict
from fedfm.runtime.flower.node_keys import admit, bindings, canonical, generate_node_key, key_text


def test_admission_by_hand(tmp_path):
    keys = {c: canonical(key_text(str(generate_node_key(tmp_path, f"k{c}")[1]))) for c in range(4)}
    bound = bindings({0: str(tmp_path / "k0.pub"), 1: str(tmp_path / "k1.pub"), 2: (tmp_path / "k2.pub").read_text()})
    assert bound == {keys[0]: 0, keys[1]: 1, keys[2]: 2}  # a path or the key line itself
    # node 10: key of client 0, claims 0 -> admitted; node 11: key of 1, claims 1 -> admitted;
    # node 12: key of 2, claims 0 -> impersonation; node 13: key k3, bound to nobody;
    # node 14: key of... none reported; node 15: key of client 2 but no answer.
    seen = {10: keys[0], 11: keys[1], 12: keys[2], 13: keys[3], 14: None}
    claims = {10: 0, 11: 1, 12: 0, 13: 1, 14: 1}
    mapping, verdicts = admit(seen, claims, bound)
    assert mapping == {0: 10, 1: 11}
    by = {v.node_id: v for v in verdicts}
    assert [by[n].admitted for n in (10, 11, 12, 13, 14)] == [True, True, False, False, False]
    assert "impersonation" in by[12].reason and by[12].bound == 2 and by[12].claimed == 0
    assert "bound to no client" in by[13].reason
    assert "no public key" in by[14].reason
    _, v = admit({15: keys[2]}, {15: None}, bound)
    assert not v[0].admitted and "did not say" in v[0].reason


def test_a_node_key_is_never_replaced(tmp_path):
    import stat

    from typer.testing import CliRunner

    from fedfm.cli import app

    keys = tmp_path / "keys"
    private, _ = generate_node_key(keys, "node-0")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    before = private.read_bytes()
    with pytest.raises(FileExistsError, match="already holds node-0, node-0.pub; a node key is never replaced"):
        generate_node_key(keys, "node-0")
    result = CliRunner().invoke(app, ["flower", "keys", "--out", str(keys), "--clients", "2"], env={"COLUMNS": "1000"})
    assert result.exit_code == 1 and "already holds node-0, node-0.pub; a node key is never replaced" in result.output
    assert private.read_bytes() == before and sorted(p.name for p in keys.iterdir()) == ["node-0", "node-0.pub"]
    done = CliRunner().invoke(app, ["flower", "keys", "--out", str(tmp_path / "fresh"), "--clients", "2"])
    assert done.exit_code == 0 and sorted(p.name for p in (tmp_path / "fresh").iterdir()) == \
        ["node-0", "node-0.pub", "node-1", "node-1.pub"]


def test_bindings_refuse_a_shared_key_and_bad_config(tmp_path):
    _, pub = generate_node_key(tmp_path, "k")
    with pytest.raises(ValueError, match="same public key"):
        bindings({0: str(pub), 1: str(pub)})
    with pytest.raises(ValueError, match=r"nodes\[0\].*does not exist"):
        bindings({0: str(tmp_path / "missing.pub")})
    with pytest.raises(ConfigError, match="mode deployment"):
        from_dict(tiny_config(tmp_path, **{"runtime.flower.nodes": {0: str(pub)}}))
    with pytest.raises(ConfigError, match=r"client ids \[5\] are outside 0..1"):
        from_dict(tiny_config(tmp_path, **{"runtime.backend": "flower", "runtime.flower.mode": "deployment", "runtime.flower.nodes": {5: str(pub)}}))


def test_loopback_tls_registered_nodes_train_impersonator_and_unregistered_refused(tmp_path):
    pytest.importorskip("flwr")
    from fedfm.runtime.flower.deployment import export_partitions, submit
    from fedfm.runtime.flower.loopback import Loopback

    keys = [generate_node_key(tmp_path / "keys", f"node-{c}") for c in range(4)]  # node-3: never registered
    raw = tiny_config(tmp_path, rounds=1, **{"federation.clients": 3, "train.epochs": 1})
    raw["runtime"] = {"progress": False, "threads": 1, "backend": "flower",
                      "flower": {"mode": "deployment", "wait_for_nodes_s": 120, "round_timeout_s": 300,
                                 "nodes": {c: str(keys[c][1]) for c in range(3)}}}
    exp = from_dict(raw)
    parts = export_partitions(exp, tmp_path / "parts")
    lb = Loopback(tmp_path / "lb", parts[:2], supernode_auth=True, keys=[keys[0][0], keys[1][0]],
                  register=[keys[c][1] for c in range(3)])
    try:
        lb.start()
        assert sorted(lb.node_ids) == [0, 1, 2] and len(set(lb.node_ids.values())) == 3
        lb.add_node(0, parts[2], keys[2][0], label="impersonator")  # client 2's key, claims client 0
        lb.add_node(1, parts[2], keys[3][0], label="unregistered")  # a key nobody registered
        done = submit(exp, tmp_path / "run", lb.name, env=lb.env, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    finally:
        lb.stop()
    link_log = (tmp_path / "lb" / "superlink.log").read_text()
    assert "https://" in link_log  # TLS
    # Flower refused the unregistered key at activation; it never became a node
    assert "No SuperNode found with the given public key" in link_log
    verdicts = [json.loads(line) for line in (tmp_path / "run" / "nodes.jsonl").read_text().splitlines()]
    admitted = sorted((v["claimed_cid"], v["bound_cid"]) for v in verdicts if v["admitted"])
    refused = [v for v in verdicts if not v["admitted"]]
    assert admitted == [(0, 0), (1, 1)] and len(verdicts) == 3
    assert len(refused) == 1 and refused[0]["claimed_cid"] == 0 and refused[0]["bound_cid"] == 2
    assert "impersonation" in refused[0]["reason"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["clients"] == [0, 1]  # the registered, correctly bound nodes trained
    failed = rows[-1]["failed"]
    assert [f["cid"] for f in failed] == [2] and "no admitted node" in failed[0]["error"]


def test_transport_admits_by_key_and_fails_the_unserved_client(tmp_path, monkeypatch):
    """FlowerTransport.discover/exchange on a stand-in Grid: three nodes (keys of clients
    0 and 1 claiming themselves, client 2's key claiming 0); client 2 gets a failed reply
    and nodes.jsonl holds the three verdicts."""
    pytest.importorskip("flwr")
    from types import SimpleNamespace

    from cryptography.hazmat.primitives import serialization as ser

    from fedfm.config import FlowerConfig
    from fedfm.core.protocols import Envelope
    from fedfm.runtime.flower.payload import CONFIG_KEY
    from fedfm.runtime.flower import transport as transport_module
    from fedfm.runtime.flower.transport import FlowerTransport

    # a Flower Message needs a running ServerApp; the stand-in Grid reads only these fields
    monkeypatch.setattr(transport_module, "message", lambda conf, data, node, kind: SimpleNamespace(
        metadata=SimpleNamespace(dst_node_id=node, message_type=kind)))

    pubs = [generate_node_key(tmp_path, f"k{c}")[1] for c in range(3)]
    pem = [ser.load_ssh_public_key(p.read_bytes()).public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo) for p in pubs]
    claims = {100: 0, 101: 1, 102: 0}  # node 102 holds client 2's key
    keys = {100: pem[0], 101: pem[1], 102: pem[2]}

    class Grid:
        def get_nodes(self):
            return [SimpleNamespace(node_id=n, public_key=k) for n, k in keys.items()]

        def send_and_receive(self, messages, timeout=None):
            out = []
            for m in messages:
                node = m.metadata.dst_node_id
                assert m.metadata.message_type == "query", "only the client-id query reaches a node here"
                out.append(SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), has_error=lambda: False,
                                           content={CONFIG_KEY: {"cid": claims[node]}}))
            return out

    cfg = FlowerConfig(mode="deployment", wait_for_nodes_s=1, nodes={c: str(p) for c, p in enumerate(pubs)})
    tr = FlowerTransport(Grid(), 3, cfg, "deployment", record=tmp_path / "nodes.jsonl")
    assert tr.discover() == {0: 100, 1: 101}
    tr.nodes = {0: 100, 1: 101}
    replies = tr.exchange([Envelope(2, "train", {}, b"")])
    assert replies[2].error.startswith("no admitted node serves client 2")
    rows = [json.loads(line) for line in (tmp_path / "nodes.jsonl").read_text().splitlines()]
    assert [(r["node_id"], r["admitted"]) for r in rows] == [(100, True), (101, True), (102, False)]
    assert rows[2]["reason"] == "impersonation: its key is bound to client 2, it claims client 0"


def test_a_connection_is_added_without_losing_the_configuration(tmp_path):
    import tomli

    from fedfm.runtime.flower.deployment import write_connection

    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text("broken = [\n")
    with pytest.raises(ValueError, match=r"config.toml is not valid TOML .*; it was left as it is"):
        write_connection(home, "prod", "10.0.0.1:9093", insecure=True)
    assert (home / "config.toml").read_text() == "broken = [\n"
    (home / "config.toml").write_text('[superlink.local]\naddress = "127.0.0.1:9093"\ninsecure = true\n')
    ca = tmp_path / "ca.crt"
    with pytest.raises(FileNotFoundError, match="--root-certificates .*ca.crt: no such file"):
        write_connection(home, "prod", "10.0.0.1:9093", ca=ca)
    with pytest.raises(ValueError, match="--root-certificates"):
        write_connection(home, "prod", "10.0.0.1:9093")
    ca.write_text("PEM")
    write_connection(home, "prod", "10.0.0.1:9093", ca=ca)
    write_connection(home, "prod", "10.0.0.1:9093", ca=ca)  # the same settings again: fine
    with pytest.raises(ValueError, match="already has a connection 'prod'.*pass --overwrite"):
        write_connection(home, "prod", "10.0.0.2:9093", ca=ca)
    write_connection(home, "prod", "10.0.0.2:9093", ca=ca, overwrite=True)
    doc = tomli.loads((home / "config.toml").read_text())["superlink"]
    assert doc["default"] == "prod" and doc["local"] == {"address": "127.0.0.1:9093", "insecure": True}
    assert doc["prod"] == {"address": "10.0.0.2:9093", "root-certificates": str(ca.resolve())}
