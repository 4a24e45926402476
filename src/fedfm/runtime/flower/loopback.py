"""A whole Flower deployment on one machine: one SuperLink, one SuperNode per client.

For demos, tests and the loopback benchmark. Every process is started here on a free
port of 127.0.0.1 and stopped by its PID (its own children, such as ``flower-superexec``,
first), also when the run fails. TLS with freshly made certificates unless
``insecure=True``. ``supernode_auth=True`` starts the SuperLink with Flower's SuperNode
authentication, registers the public keys in ``register`` (``flwr supernode register``)
and starts each SuperNode with its private key from ``keys``.
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedfm.runtime.flower.certs import make_certificates
from fedfm.runtime.flower.deployment import flower_env, superlink_command, supernode_command, write_connection


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"flower-superlink did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop ``proc`` and the processes it started, each by PID: SIGTERM, then SIGKILL."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        family = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)
    if proc.poll() is None:
        proc.wait(timeout=grace)


@dataclass
class Loopback:
    """``with Loopback(dir, data_paths) as lb: lb.connection`` -> a running deployment."""

    workdir: Path
    data_paths: list[Path | None]
    insecure: bool = False
    name: str = "fedfm-loopback"
    procs: list[subprocess.Popen] = field(default_factory=list)
    supernode_auth: bool = False  # --enable-supernode-auth: only registered keys may connect
    keys: list[Path | None] | None = None  # each SuperNode's private key (node_keys.generate_node_key)
    register: list[Path] = field(default_factory=list)  # public keys to register before the nodes start

    def __enter__(self) -> "Loopback":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _spawn(self, cmd: list[str], log: Path) -> subprocess.Popen:
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.workdir / "flwr-home"
        self.env = flower_env(flwr_home=self.flwr_home)
        self.certs = None if self.insecure else make_certificates(self.workdir / "certs")
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        link_log = self.workdir / "superlink.log"
        link = self._spawn(superlink_command(port, self.certs, self.insecure, supernode_auth=self.supernode_auth), link_log)
        wait_for_port(port, 120, link, link_log)
        ca = None if self.certs is None else self.certs["ca"]
        write_connection(self.flwr_home, self.name, self.address, ca=ca, insecure=self.insecure, overwrite=True)  # its own home
        if self.register:
            from fedfm.runtime.flower.node_keys import register_keys

            self.node_ids = register_keys(dict(enumerate(self.register)), self.name, self.env)
        keys = self.keys or [None] * len(self.data_paths)
        for cid, (data, key) in enumerate(zip(self.data_paths, keys, strict=True)):
            self.add_node(cid, data, key)

    def add_node(self, cid: int, data: Path | None, key: Path | None = None, label: str | None = None) -> subprocess.Popen:
        """Start one more SuperNode that says it serves ``cid`` (tests: an impersonator)."""
        label = label or str(cid)
        ca = None if self.certs is None else self.certs["ca"]
        store = self.workdir / f"store-{label}"
        cmd = supernode_command(self.address, cid, data, free_port(), ca=ca, insecure=self.insecure, store_dir=store, auth_key=key)
        return self._spawn(cmd, self.workdir / f"supernode-{label}.log")

    def stop(self) -> None:
        for proc in reversed(self.procs):  # SuperNodes first, the SuperLink last
            stop_process(proc)
        self.procs = [p for p in self.procs if p.poll() is None]
