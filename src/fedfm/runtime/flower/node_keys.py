"""Who may join a deployment: SuperNode keys, their registration, and the binding of a
fedfm client id to a node's public key (``runtime.flower.nodes``).

Two layers, each enforcing a different thing:

1. **Flower 1.42's SuperNode authentication** (``flower-superlink --enable-supernode-auth``,
   ``flwr supernode register KEY.pub``, ``flower-supernode --auth-supernode-private-key
   KEY``). Every Fleet API request of a SuperNode carries its public key and a signature of
   a fresh timestamp made with its private key; the SuperLink checks the signature, the
   timestamp window, and that the node id the request claims is the one registered for
   that key. With ``--enable-supernode-auth`` a node may only *activate* a key that an
   operator registered through the Control API (``flwr supernode register``); any other
   key is refused at activation ("No SuperNode found with the given public key", HTTP 412
   in the SuperLink log) and never becomes a node the ServerApp can see. Flower knows
   nothing of fedfm's client ids: a registered node may claim any ``cid`` in its node config.
2. **fedfm's binding** (this module, used by ``transport.FlowerTransport.discover``): the
   federation's config maps each client id to a public key (``runtime.flower.nodes: {cid:
   key file or key text}``). The ServerApp reads every node's public key from the SuperLink
   (``Grid.get_nodes()`` -> ``NodeInfo.public_key``, the key Flower authenticated) and
   admits a node for client ``c`` only if its key is the one bound to ``c``. A node whose
   key is bound to no client, or bound to another client than the one it claims
   (impersonation), is refused; every verdict is written to ``<run>/nodes.jsonl`` and a
   client left without an admitted node fails each round it is asked ("no admitted node"),
   recorded in metrics.jsonl like any failed client.

Without layer 1 (SuperNodes self-register their own keys) layer 2 still refuses unbound
keys and impersonation, but then anyone can make the SuperLink *accept a connection*; with
both, an unregistered node cannot even connect. What neither layer can tell apart: a node
that holds a stolen private key of client ``c`` is client ``c``. Read in Flower 1.42's
source, not tested here: the SuperLink checks that a reply answers a message sent to the
node named as its source, but not that this source is the node that pushed it; a forged
reply would need the id of a message sent to the other node, which only that node pulls.

Keys are EC P-384 in OpenSSH format (what ``flwr supernode register`` and
``flower-supernode`` read), written with ``cryptography``.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

KEY_PREFIX = "ecdsa-sha2-"


def key_paths(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """(private, public) key files of ``name`` under ``out_dir``."""
    return Path(out_dir) / name, Path(out_dir) / f"{name}.pub"


def existing_keys(out_dir: str | Path, names: list[str]) -> list[str]:
    """The key files of ``names`` already under ``out_dir`` (a node's key is never replaced)."""
    return [p.name for n in names for p in key_paths(out_dir, n) if p.exists()]


def generate_node_key(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``<name>`` (private, OpenSSH PEM, created with mode 600) and ``<name>.pub``
    (OpenSSH) under ``out_dir``: an EC P-384 key pair for ``flower-supernode
    --auth-supernode-private-key``. An existing key file is never replaced (FileExistsError):
    a SuperNode registered with it would lose its identity."""
    import os

    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder for key files")
    there = existing_keys(out, [name])
    if there:
        raise FileExistsError(f"{out} already holds {', '.join(there)}; a node key is never replaced: pick another folder")
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = key_paths(out, name)
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, never over a file
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption()))
    with open(public, "xb") as f:
        f.write(key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH) + b"\n")
    return private, public


def key_text(value: str, base: str | Path | None = None) -> str:
    """The OpenSSH public-key line of ``value``: the line itself, or the file it names."""
    value = str(value).strip()
    if value.startswith(KEY_PREFIX):
        return value
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    if not path.exists():
        raise FileNotFoundError(f"public key file {path} does not exist")
    return path.read_text().strip()


def canonical(key: bytes | str) -> bytes:
    """DER SubjectPublicKeyInfo of an OpenSSH line (str) or a PEM key (bytes, as Flower's
    ``NodeInfo.public_key``), so keys from both sides compare byte for byte."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        loaded = ser.load_ssh_public_key(key.encode()) if isinstance(key, str) else ser.load_pem_public_key(key)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        shown = key if isinstance(key, str) else key.decode(errors="replace")
        raise ValueError(f"not an OpenSSH public key line ({exc}): '{shown[:40]}{'...' if len(shown) > 40 else ''}'") from None
    if not isinstance(loaded, ec.EllipticCurvePublicKey):
        raise ValueError(f"not an EC public key ({type(loaded).__name__}); Flower's SuperNode keys are EC (P-384)")
    return loaded.public_bytes(ser.Encoding.DER, ser.PublicFormat.SubjectPublicKeyInfo)


def bindings(nodes: Mapping[int, str], base: str | Path | None = None) -> dict[bytes, int]:
    """``{canonical key: cid}`` from ``runtime.flower.nodes``; one key per client."""
    out: dict[bytes, int] = {}
    for cid, value in sorted(nodes.items()):
        try:
            key = canonical(key_text(value, base))
        except (ValueError, FileNotFoundError) as exc:
            named = "" if str(value).strip().startswith(KEY_PREFIX) or isinstance(exc, FileNotFoundError) else f"{value}: "
            raise ValueError(f"runtime.flower.nodes[{cid}]: {named}{exc}") from None
        if key in out:
            raise ValueError(f"runtime.flower.nodes: clients {out[key]} and {cid} are bound to the same public key; give each node its own key")
        out[key] = int(cid)
    return out


def config_problems(exp) -> list[str]:
    """``runtime.flower.nodes`` that cannot work: outside deployment, or a client id out of range."""
    nodes = exp.runtime.flower.nodes
    if not nodes:
        return []
    problems = []
    if exp.runtime.backend != "flower" or exp.runtime.flower.mode != "deployment":
        problems.append("runtime.flower.nodes binds client ids to SuperNode keys; it needs runtime.backend flower with runtime.flower.mode deployment")
    n = exp.federation.clients
    bad = sorted(c for c in nodes if not 0 <= int(c) < n)
    if bad:
        problems.append(f"runtime.flower.nodes: client ids {bad} are outside 0..{n - 1} (federation.clients is {n})")
    return problems


def key_problem(nodes: Mapping[int, str] | None) -> str | None:
    """Why the keys of ``runtime.flower.nodes`` cannot be bound (a key file missing, not an
    EC public key, one key for two clients), or None. Checked where the keys are used
    (``submit``, ``fedfm flower register``), not when a config loads: an example config
    names key files that ``fedfm flower keys`` writes later."""
    if not nodes:
        return None
    try:
        bindings(nodes)
    except ValueError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class Verdict:
    node_id: int
    claimed: int | None
    bound: int | None
    admitted: bool
    reason: str

    def row(self) -> dict:
        return {"node_id": self.node_id, "claimed_cid": self.claimed, "bound_cid": self.bound,
                "admitted": self.admitted, "reason": self.reason}


def admit(keys: Mapping[int, bytes], claims: Mapping[int, int | None], bound: Mapping[bytes, int]) -> tuple[dict[int, int], list[Verdict]]:
    """Which node serves which client. ``keys``: node id -> canonical public key (as the
    SuperLink authenticated it); ``claims``: node id -> the client id the node says it
    serves (None: it did not answer); ``bound``: canonical key -> client id (the config).
    Returns (cid -> node id of the admitted nodes, one verdict per node)."""
    mapping: dict[int, int] = {}
    verdicts = []
    for node in sorted(claims):
        claimed, key = claims[node], keys.get(node)
        owner = bound.get(key) if key is not None else None
        if key is None:
            v = Verdict(node, claimed, None, False, "the SuperLink gave no public key for this node")
        elif owner is None:
            v = Verdict(node, claimed, None, False, "its public key is bound to no client in runtime.flower.nodes")
        elif claimed is None:
            v = Verdict(node, None, owner, False, "it did not say which client it serves")
        elif claimed != owner:
            v = Verdict(node, claimed, owner, False, f"impersonation: its key is bound to client {owner}, it claims client {claimed}")
        else:
            v = Verdict(node, claimed, owner, True, "key bound to the client it claims")
            mapping[claimed] = node
        verdicts.append(v)
    return mapping, verdicts


def register_command(flwr: str, public_key: str | Path, superlink: str | None) -> list[str]:
    """``flwr supernode register KEY.pub [SUPERLINK] --format json`` (Flower 1.42 Control API)."""
    cmd = [flwr, "supernode", "register", str(Path(public_key).expanduser().resolve())]
    if superlink:
        cmd.append(superlink)
    return cmd + ["--format", "json"]


def register_keys(public_keys: Mapping[int, str | Path], superlink: str | None, env: dict[str, str] | None = None) -> dict[int, int]:
    """Register every node's public key on the SuperLink; returns cid -> Flower node id.
    Raises with Flower's output when a registration fails (e.g. the key is already
    registered, or the connection is wrong)."""
    from fedfm.runtime.flower.deployment import flower_bin, flower_env

    out = {}
    for cid, path in sorted(public_keys.items()):
        done = subprocess.run(register_command(flower_bin("flwr"), path, superlink), env=flower_env(env), capture_output=True, text=True)
        node = _node_id(done.stdout)
        if done.returncode != 0 or node is None:
            raise RuntimeError(f"flwr supernode register {path} (client {cid}) failed ({done.returncode}): {(done.stdout + done.stderr)[-1500:]}")
        out[int(cid)] = node
    return out


def _node_id(stdout: str) -> int | None:
    """The ``node-id`` of ``flwr ... --format json`` output (the JSON object at its end)."""
    start = stdout.find("{")
    if start < 0:
        return None
    try:
        return int(json.loads(stdout[start:])["node-id"])
    except (ValueError, KeyError, TypeError):
        return None


def write_rows(path: str | Path | None, rows: Iterable[dict]) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
