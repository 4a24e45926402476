"""The Flower backends under a new user's mistakes (runtime/flower/*, cli_flower.py).

Every test here is hand-checkable and fast: the node discovery on a stand-in Grid (nodes
that arrive late, claim a client id outside the federation, claim one client twice, or
name no client), the text of a failed ClientApp and of a failed ``flwr run`` stream,
what ``fedfm flower submit`` sends (always a deployment) and how it ends when the
ServerApp fails, SuperLink addresses, and a SuperNode's own data file that is missing.
"""

from __future__ import annotations

import json
import stat
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("flwr")

from conftest import tiny_config  # noqa: E402
from fedfm.config import ConfigError, FlowerConfig, from_dict  # noqa: E402
from fedfm.runtime.flower import transport as transport_module  # noqa: E402
from fedfm.runtime.flower.payload import CONFIG_KEY  # noqa: E402
from fedfm.runtime.flower.transport import FlowerSetupError, FlowerTransport, error_reason  # noqa: E402


class Grid:
    """A SuperLink seen from the ServerApp: ``arrivals[i]`` is the node list of the i-th
    look (the last one repeats); ``claims[node]`` what the node answers (None: an error)."""

    def __init__(self, arrivals, claims):
        self.arrivals, self.claims, self.looks, self.asked = arrivals, claims, 0, []

    def get_node_ids(self):
        nodes = self.arrivals[min(self.looks, len(self.arrivals) - 1)]
        self.looks += 1
        return nodes

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            self.asked.append(node)
            cid = self.claims[node]
            error = SimpleNamespace(reason="<class 'ValueError'>:<'node config names no client'>")
            out.append(SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), has_error=lambda c=cid: c is None,
                                       error=error, content={CONFIG_KEY: {"cid": cid}}))
        return out


@pytest.fixture
def stand_in(monkeypatch):
    # a Flower Message needs a running ServerApp; the stand-in Grid reads only these fields
    monkeypatch.setattr(transport_module, "message", lambda conf, data, node, kind: SimpleNamespace(
        metadata=SimpleNamespace(dst_node_id=node, message_type=kind)))


def transport(grid, clients=2, wait=3.0):
    return FlowerTransport(grid, clients, FlowerConfig(mode="deployment", wait_for_nodes_s=wait), "deployment")


def test_discovery_waits_for_a_late_node_past_one_with_a_wrong_client_id(stand_in):
    # 2 clients; nodes 100 (client 0) and 105 (claims client 5) come first: two nodes, but
    # client 1's node 101 only arrives at the third look. Each node is asked once.
    grid = Grid([[100, 105], [100, 105], [100, 105, 101]], {100: 0, 105: 5, 101: 1})
    assert transport(grid).discover() == {0: 100, 1: 101}
    assert sorted(grid.asked) == [100, 101, 105]


def test_two_nodes_for_one_client_are_named(stand_in):
    grid = Grid([[7, 8]], {7: 0, 8: 0})
    with pytest.raises(FlowerSetupError, match=r"client 0 is served by two nodes \(7 and 8\); give each SuperNode its own cid"):
        transport(grid, wait=0.5).discover()


def test_a_missing_client_names_the_nodes_that_could_not_serve_it(stand_in):
    # node 1 serves client 0; node 2 claims client 9 (outside 0..1); node 3 names no client
    grid = Grid([[1, 2, 3]], {1: 0, 2: 9, 3: None})
    with pytest.raises(FlowerSetupError) as info:
        transport(grid, wait=0.5).discover()
    text = str(info.value)
    assert text.startswith("no node serves clients [1] (federation.clients is 2; 1 node(s) served a client "
                           "within runtime.flower.wait_for_nodes_s=0.5)")
    assert "node(s) [2] claim client ids [9] outside 0..1" in text
    assert "node(s) [3] did not say which client they serve (no cid in --node-config?)" in text


def test_a_node_that_left_mid_round_fails_with_a_reason(stand_in):
    """Node 11 answers; node 12 stopped sending heartbeats, so the SuperLink itself answers
    the message sent to it (source node 0, matched by message id); node 13 gives nothing
    back before the grid returns."""
    from fedfm.core.protocols import Envelope
    from fedfm.runtime.flower.payload import METRICS_KEY, PAYLOAD_KEY, bytes_to_record

    left = "Error: Node Unavailable - The destination node failed to report a heartbeat"

    class LeftGrid:
        def send_and_receive(self, messages, timeout=None):
            for i, m in enumerate(messages):
                m.metadata.message_id = f"m{i}"  # as Flower's grids do when they push
            ok = SimpleNamespace(metadata=SimpleNamespace(src_node_id=11, reply_to_message_id="m0"), has_error=lambda: False,
                                 content={PAYLOAD_KEY: bytes_to_record(b"update"), METRICS_KEY: {"train_s": 2}})
            gone = SimpleNamespace(metadata=SimpleNamespace(src_node_id=0, reply_to_message_id="m1"), has_error=lambda: True,
                                   error=SimpleNamespace(reason=left))
            return [ok, gone]

    tr = FlowerTransport(LeftGrid(), 3, FlowerConfig(mode="deployment", round_timeout_s=60), "deployment")
    tr.nodes = {0: 11, 1: 12, 2: 13}
    replies = tr.exchange([Envelope(c, "train", {}, b"") for c in range(3)])
    assert (replies[0].data, replies[0].error, replies[0].info) == (b"update", None, {"train_s": 2.0})
    assert replies[1].error == left
    assert replies[2].error == ("no reply from node 13 (the SuperLink gave none back before "
                                "runtime.flower.round_timeout_s=60 s: its SuperNode may have left)")


def test_a_clientapp_exception_reads_as_python_writes_it():
    assert error_reason("<class 'FileNotFoundError'>:<'no such file: /d/c1.parquet'>") == \
        "FileNotFoundError: no such file: /d/c1.parquet"
    assert error_reason("""<class 'builtins.ValueError'>:<"client 1's file">""") == "ValueError: client 1's file"
    assert error_reason("Message timed out") == "Message timed out"


FAILED_STREAM = """Using SuperLink: prod (127.0.0.1:9093)
round   0  accuracy 0.4750  loss 0.6935  (initial model, before training)  0.0 s
ERROR :     ServerApp raised an exception
Traceback (most recent call last):
  File "/venv/flwr/server/run_serverapp.py", line 60, in run
    server_app(grid=grid, context=context)
  File "/src/fedfm/runtime/flower/transport.py", line 83, in discover
    raise FlowerSetupError(...)
fedfm.runtime.flower.transport.FlowerSetupError: no node serves clients [1] (federation.clients is 2)
ERROR :     Exit Code: 201
"""


def test_a_failed_run_is_told_from_the_stream_and_its_frames_left_out():
    from fedfm.runtime.flower.deployment import TracebackFilter, run_failure

    assert run_failure(FAILED_STREAM) == "FlowerSetupError: no node serves clients [1] (federation.clients is 2)"
    assert run_failure("ERROR :     Exit Code: 202\n") == "Flower exit code 202"
    assert run_failure("round   1  accuracy 0.9\n") is None
    keep = TracebackFilter()
    shown = [kept for kept in (keep(line) for line in FAILED_STREAM.splitlines(keepends=True)) if kept is not None]
    assert not any("File " in line for line in shown)  # 4 frame lines dropped, the 6 others kept
    assert len(shown) == 6 and shown[4].startswith("fedfm.runtime.flower.transport.FlowerSetupError: no node serves")


def fake_flwr(tmp_path, stream: str):
    """A stand-in ``flwr`` that prints ``stream`` and exits 0, as flwr run does after a
    ServerApp failure."""
    (tmp_path / "stream.txt").write_text(stream)
    exe = tmp_path / "flwr"
    exe.write_text(f"#!{sys.executable}\nimport sys\nsys.stdout.write(open({str(tmp_path / 'stream.txt')!r}).read())\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return str(exe)


def test_submit_sends_a_deployment_and_fails_when_the_serverapp_did(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import yaml

    from fedfm.cli import app
    from fedfm.runtime.flower import deployment

    monkeypatch.setattr(deployment, "flower_bin", lambda name: fake_flwr(tmp_path, FAILED_STREAM))
    raw = tiny_config(tmp_path)  # runtime.backend local, as examples/quickstart.yaml
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["flower", "submit", str(tmp_path / "job.yaml"), "--superlink", "prod", "--out", str(run)],
                                env={"COLUMNS": "1000"})
    assert result.exit_code == 1
    assert "error: the run on SuperLink 'prod' failed: FlowerSetupError: no node serves clients [1]" in result.output
    import tomli

    sent = tomli.loads((run / "flower-run-config.toml").read_text())
    exp = json.loads(sent["experiment"])
    assert (exp["runtime"]["backend"], exp["runtime"]["flower"]["mode"]) == ("flower", "deployment")
    assert (sent["resume"], sent["overwrite"]) == (False, False)
    result = CliRunner().invoke(app, ["flower", "submit", str(tmp_path / "job.yaml"), "--superlink", "prod", "--out", str(run),
                                      "--resume"], env={"COLUMNS": "1000"})
    assert tomli.loads((run / "flower-run-config.toml").read_text())["resume"] is True
    both = CliRunner().invoke(app, ["flower", "submit", str(tmp_path / "job.yaml"), "--superlink", "prod", "--resume", "--overwrite"])
    assert both.exit_code == 2 and "at most one of --resume and --overwrite" in both.output


def test_submit_refuses_what_a_deployment_cannot_run_before_sending(tmp_path):
    from fedfm.runtime.flower.deployment import as_deployment, submit

    exp = from_dict(tiny_config(tmp_path, **{"runtime.transport": "processes"}))  # the local backend's transport
    with pytest.raises(ConfigError, match="runtime.transport: processes is the local backend's transport; runtime.backend is 'flower'"):
        as_deployment(exp)
    with pytest.raises(ConfigError, match="runtime.transport"):
        submit(exp, tmp_path / "run", "prod")
    assert not (tmp_path / "run").exists()  # nothing written, no flwr started


def test_a_superlink_address_must_be_host_and_port(tmp_path):
    from fedfm.runtime.flower.deployment import write_connection

    for bad in ("notanaddress", "127.0.0.1", "127.0.0.1:0", "host:70000", "https://host:9093"):
        with pytest.raises(ValueError, match=f"SuperLink address '{bad}' is not HOST:PORT"):
            write_connection(tmp_path, "prod", bad, insecure=True)
    assert not (tmp_path / "config.toml").exists()
    for good in ("superlink.example.org:9093", "127.0.0.1:9093", "[::1]:9093"):
        write_connection(tmp_path, "prod", good, insecure=True, overwrite=True)


def test_a_supernodes_missing_data_file_is_named_with_its_client(tmp_path):
    from fedfm.runtime.flower.session import owner_federation

    exp = from_dict(tiny_config(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"^client 1: node config data-path .*nope.parquet: file not found"):
        owner_federation(exp, 1, str(tmp_path / "nope.parquet"))
    (tmp_path / "nolabel.csv").write_text("text\nfine film\n")
    with pytest.raises(ValueError, match=r"^client 0: node config data-path .*nolabel.csv: .*label"):
        owner_federation(exp, 0, str(tmp_path / "nolabel.csv"))


def test_simulation_resources_the_machine_lacks_are_refused_by_name(tmp_path):
    from fedfm.runtime.flower.simulation import resource_problems

    exp = from_dict(tiny_config(tmp_path, **{"runtime.backend": "flower", "runtime.flower.num_gpus": 1, "runtime.flower.num_cpus": 4}))
    assert resource_problems(exp, cpus=2, gpus=0) == [
        "runtime.flower.num_cpus 4: this machine has 2 CPU core(s); Ray could not place one virtual client (use at most 2)",
        "runtime.flower.num_gpus 1: this machine has no CUDA GPU; Ray could not place one virtual client (use 0, the default)",
    ]
    assert resource_problems(exp, cpus=4, gpus=1) == []
    half = from_dict(tiny_config(tmp_path, **{"runtime.backend": "flower", "runtime.flower.num_gpus": 0.5, "runtime.device": "cuda"}))
    assert resource_problems(half, cpus=2, gpus=1) == []  # two clients share one GPU
    blind = from_dict(tiny_config(tmp_path, **{"runtime.backend": "flower", "runtime.device": "cuda"}))
    assert resource_problems(blind, cpus=2, gpus=1) == [
        "runtime.device cuda: a virtual client sees only the GPUs runtime.flower.num_gpus gives it (Ray hides the others), "
        "and that is 0; set runtime.flower.num_gpus (e.g. 1, or 0.5 for two clients per GPU)"]


def test_a_crashed_simulation_runtime_stops_the_servers_wait(stand_in):
    """With ``stop`` (simulation), replies are pulled in a loop that gives up once the
    runtime has crashed, instead of waiting round_timeout_s for replies that never come."""
    import threading

    class SilentGrid:
        pulls = 0

        def push_messages(self, messages):
            return [f"m{i}" for i, _ in enumerate(messages)]

        def pull_messages(self, ids):
            self.pulls += 1
            if self.pulls == 3:
                stop.set()  # Flower's runtime crashed while the ServerApp waited
            return []

    stop = threading.Event()
    grid = SilentGrid()
    tr = FlowerTransport(grid, 1, FlowerConfig(round_timeout_s=3600), "simulation", stop=stop)
    tr.nodes = {0: 5}
    from fedfm.core.protocols import Envelope

    with pytest.raises(FlowerSetupError, match="the Flower simulation runtime stopped"):
        tr.exchange([Envelope(0, "train", {}, b"")])
    assert grid.pulls == 3


def test_bound_keys_are_checked_before_anything_is_sent_or_registered(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import yaml

    from fedfm.cli import app
    from fedfm.runtime.flower.deployment import submit
    from fedfm.runtime.flower.node_keys import generate_node_key

    _, good = generate_node_key(tmp_path / "keys", "node-0")
    (tmp_path / "garbage.pub").write_text("not a key\n")
    raw = tiny_config(tmp_path, **{"runtime.backend": "flower", "runtime.flower.mode": "deployment"})
    raw["runtime"]["flower"]["nodes"] = {0: str(good), 1: str(tmp_path / "garbage.pub")}
    with pytest.raises(ValueError, match=r"runtime.flower.nodes\[1\]: .*garbage.pub: not an OpenSSH public key line"):
        submit(from_dict(raw), tmp_path / "run", "prod")
    assert not (tmp_path / "run").exists()  # nothing written, no flwr started
    raw["runtime"]["flower"]["nodes"] = {0: str(good), 1: str(tmp_path / "keys" / "node-1.pub")}  # never made
    (tmp_path / "auth.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setattr("fedfm.runtime.flower.node_keys.register_keys", lambda *a, **k: pytest.fail("registered"))
    result = CliRunner().invoke(app, ["flower", "register", str(tmp_path / "auth.yaml"), "--superlink", "prod"],
                                env={"COLUMNS": "1000"})
    assert result.exit_code == 2
    assert "error: runtime.flower.nodes[1]: public key file" in result.output and "node-1.pub does not exist" in result.output


def test_a_node_config_client_id_that_is_no_integer_is_named():
    from fedfm.runtime.flower.client_app import node_cid

    assert node_cid(SimpleNamespace(node_config={"cid": "3"}, node_id=7)) == 3
    with pytest.raises(ValueError, match=r"^node 7: node config cid='abc' is not a client id \(an integer\)$"):
        node_cid(SimpleNamespace(node_config={"cid": "abc"}, node_id=7))
    with pytest.raises(ValueError, match=r"node 7: node config names no client; start the SuperNode with --node-config 'cid=<id>'"):
        node_cid(SimpleNamespace(node_config={"client": 1}, node_id=7))


def test_a_connection_is_either_tls_or_insecure(tmp_path):
    from fedfm.runtime.flower.deployment import write_connection

    (tmp_path / "ca.crt").write_text("PEM")
    with pytest.raises(ValueError, match="either --root-certificates .TLS. or --insecure, not both"):
        write_connection(tmp_path, "prod", "127.0.0.1:9093", ca=tmp_path / "ca.crt", insecure=True)
    assert not (tmp_path / "config.toml").exists()


def test_a_task_without_labels_gets_no_owner_files(tmp_path):
    """A data owner's file holds text and label; a causal LM experiment (as
    examples/shakespeare.yaml) is refused by name, where export-partitions raised a
    KeyError about a missing 'label' column."""
    from fedfm.runtime.flower.deployment import export_partitions
    from fedfm.runtime.flower.session import owner_federation

    exp = from_dict(tiny_config(tmp_path))
    lm = exp.model_copy(deep=True)
    lm.model.task = "causal_lm"
    with pytest.raises(ValueError, match=r"^export-partitions: model.task causal_lm: a SuperNode's own data file "
                                         r"\(node config data-path; columns text and label\) serves text_classification"):
        export_partitions(lm, tmp_path / "parts")
    assert not (tmp_path / "parts").exists()
    with pytest.raises(ValueError, match=r"^client 1: model.task causal_lm: .*start the SuperNodes without data-path"):
        owner_federation(lm, 1, str(tmp_path / "toy.csv"))


def test_an_out_folder_that_is_a_file_is_named_not_a_traceback(tmp_path):
    from typer.testing import CliRunner

    import yaml

    from fedfm.cli import app

    (tmp_path / "job.yaml").write_text(yaml.safe_dump(tiny_config(tmp_path)))
    (tmp_path / "afile").write_text("")
    run = CliRunner()
    env = {"COLUMNS": "1000"}
    done = run.invoke(app, ["flower", "submit", str(tmp_path / "job.yaml"), "--superlink", "prod", "--out", str(tmp_path / "afile")], env=env)
    assert done.exit_code == 2 and f"error: --out {tmp_path / 'afile'} is a file, not a folder" in done.output
    done = run.invoke(app, ["flower", "export-partitions", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "afile" / "x")], env=env)
    assert done.exit_code == 1 and f"error: --out {tmp_path / 'afile' / 'x'}: Not a directory" in done.output
    done = run.invoke(app, ["flower", "keys", "--out", str(tmp_path / "afile" / "k"), "--clients", "1"], env=env)
    assert done.exit_code == 1 and f"error: --out {tmp_path / 'afile' / 'k'}: Not a directory" in done.output
