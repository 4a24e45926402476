"""``runtime.flower.mode: deployment``: helpers around Flower's SuperLink / SuperNodes.

fedfm does not start the long-running Flower processes for you in production (each data
owner starts its own SuperNode); these helpers build what those commands need:

- ``export_partitions``: one data file per client (columns ``text``, ``label``), cut
  exactly as the local backend cuts the experiment's source, for demos and parity runs;
- ``supernode_command`` / ``superlink_command``: the documented command lines, TLS by
  default, ``--insecure`` only when asked (loopback demos);
- ``write_connection``: a SuperLink connection in the Flower Configuration
  (``$FLWR_HOME/config.toml``) that ``flwr run`` reads;
- node keys (``node_keys``): ``supernode_auth`` / ``auth_key`` start the SuperLink with
  Flower's SuperNode authentication and a SuperNode with its key; ``runtime.flower.nodes``
  binds each client id to its node's key (its key text travels in the run config);
- ``submit``: ``flwr run`` on the shipped app (``app/pyproject.toml``) with the
  experiment passed through the run config (keys ``experiment`` and ``out``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from fedfm.runtime.flower.simulation import quiet_flower_env

APP_DIR = Path(__file__).with_name("app")


def flower_bin(name: str) -> str:
    """A Flower executable from this interpreter's environment (or PATH)."""
    here = Path(sys.executable).with_name(name)
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"'{name}' not found; install the extra: pip install 'fedfm[flower]'")
    return found


def flower_env(base: dict[str, str] | None = None, flwr_home: str | Path | None = None) -> dict[str, str]:
    """Environment for Flower processes: telemetry and update checks off, this
    interpreter's bin directory first on PATH (SuperLink starts ``flower-superexec``),
    and fedfm's own source directory first on PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    quiet_flower_env(env)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    # The ServerApp / ClientApp processes import fedfm from where this process found it.
    here = str(Path(__file__).resolve().parents[3])
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([here, *[str(Path(p).resolve()) for p in paths if Path(p).resolve() != Path(here)]])
    return env


def export_partitions(exp, out_dir: str | Path, fmt: str = "parquet", overwrite: bool = False) -> list[Path]:
    """Write ``client_<cid>.<fmt>`` for every client: the rows the local backend gives it,
    in the same order, so a deployment on these files trains on the same data. A client file
    already there is replaced only with ``overwrite``; without it nothing is written."""
    from fedfm.data import build_federation, load_source
    from fedfm.runtime.flower.session import owner_file_problem

    if fmt not in ("parquet", "jsonl"):
        raise ValueError(f"export-partitions: format '{fmt}' is not parquet or jsonl")
    problem = owner_file_problem(exp)
    if problem is not None:
        raise ValueError(f"export-partitions: {problem}")
    if exp.data.label_column is None:
        raise ValueError("export-partitions: data.label_column is unset; client files need labels")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"export-partitions: --out {out} is a file, not a folder")
    fed = build_federation(load_source(exp.data), exp.federation, exp.seed)
    if "label" not in fed.frame.columns:
        raise ValueError(f"export-partitions: data.source '{exp.data.source}' gives no labels (columns: "
                         f"{', '.join(map(str, fed.frame.columns))}); client files need text and label")
    paths = {c.cid: out / f"client_{c.cid}.{fmt}" for c in fed.clients}
    there = [p.name for p in paths.values() if p.exists()]
    if there and not overwrite:
        more = f", ... ({len(there)} in all)" if len(there) > 3 else ""
        raise ValueError(f"export-partitions: {out} already holds {', '.join(there[:3])}{more}; "
                         "pass --overwrite to replace them, or pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    for c in fed.clients:
        frame = fed.frame.iloc[c.indices][["text", "label"]].reset_index(drop=True)
        if fmt == "parquet":
            frame.to_parquet(paths[c.cid], index=False)
        else:
            frame.to_json(paths[c.cid], orient="records", lines=True)
    return list(paths.values())


def _tls_args(certs: dict[str, str] | None, insecure: bool, flags: dict[str, str]) -> list[str]:
    if insecure:
        return ["--insecure"]
    if not certs:
        raise ValueError("TLS is the default: give the certificate files, or --insecure for a loopback demo")
    return [arg for key, flag in flags.items() for arg in (flag, str(certs[key]))]


def superlink_command(port: int, certs: dict[str, str] | None = None, insecure: bool = False, host: str = "127.0.0.1", supernode_auth: bool = False) -> list[str]:
    """``flower-superlink``: Fleet, Control and Runtime APIs on ``host:port`` (Flower 1.42).
    ``supernode_auth``: only SuperNodes whose public keys were registered with ``flwr
    supernode register`` may connect (``--enable-supernode-auth``; Flower requires TLS)."""
    if supernode_auth and insecure:
        raise ValueError("SuperNode authentication needs TLS (Flower refuses --enable-supernode-auth with --insecure)")
    tls = _tls_args(certs, insecure, {"ca": "--ssl-ca-certfile", "cert": "--ssl-certfile", "key": "--ssl-keyfile"})
    return [
        flower_bin("flower-superlink"),
        *tls,
        "--host", host,
        "--port", str(port),
        "--disable-runtime-dependency-installation",
        *(["--enable-supernode-auth"] if supernode_auth else []),
    ]  # fmt: skip


def supernode_command(
    superlink: str,
    cid: int,
    data_path: str | Path | None,
    port: int,
    ca: str | Path | None = None,
    insecure: bool = False,
    store_dir: str | Path | None = None,
    auth_key: str | Path | None = None,
) -> list[str]:
    """``flower-supernode`` for one data owner; its node config names the client and its data.
    ``auth_key``: the node's private key (OpenSSH EC, ``fedfm flower keys``), with which it
    signs every request to the SuperLink (``--auth-supernode-private-key``)."""
    node = [f"cid={int(cid)}"]
    if data_path is not None:
        node.append(f'data-path="{Path(data_path).resolve()}"')
    if store_dir is not None:
        node.append(f'store-dir="{Path(store_dir).resolve()}"')
    tls = ["--insecure"] if insecure else ["--root-certificates", str(ca)]
    if not insecure and ca is None:
        raise ValueError("TLS is the default: give the CA certificate (--root-certificates), or --insecure")
    return [
        flower_bin("flower-supernode"),
        *tls,
        "--superlink", superlink,
        "--port", str(port),
        "--node-config", " ".join(node),
        *(["--auth-supernode-private-key", str(Path(auth_key).expanduser().resolve())] if auth_key else []),
    ]  # fmt: skip


def check_address(address: str) -> None:
    """A SuperLink address is ``HOST:PORT`` (``[IPv6]:PORT``), port 1..65535; anything else
    is refused here, rather than by ``flwr run`` later as "connection unavailable"."""
    import re

    found = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})", address.strip())
    if found is None or not 1 <= int(found.group(2)) <= 65535:
        raise ValueError(f"SuperLink address '{address}' is not HOST:PORT (e.g. superlink.example.org:9093 or 127.0.0.1:9093)")


def write_connection(flwr_home: str | Path, name: str, address: str, ca: str | Path | None = None, insecure: bool = False,
                     overwrite: bool = False) -> Path:
    """Add a SuperLink connection to ``$FLWR_HOME/config.toml`` and make it the default;
    other connections in the file are kept. A connection of the same name with other
    settings is replaced only with ``overwrite``; an unreadable file is named, never
    rewritten."""
    import tomli
    import tomli_w

    check_address(address)
    entry: dict[str, Any] = {"address": address}
    if insecure and ca is not None:
        raise ValueError("give either --root-certificates (TLS) or --insecure, not both")
    if insecure:
        entry["insecure"] = True
    elif ca is not None:
        if not Path(ca).is_file():
            raise FileNotFoundError(f"--root-certificates {ca}: no such file")
        entry["root-certificates"] = str(Path(ca).resolve())
    else:
        raise ValueError("TLS is the default: give the SuperLink's CA certificate (--root-certificates), "
                         "or --insecure for a loopback demo")
    path = Path(flwr_home) / "config.toml"
    try:
        doc: dict[str, Any] = tomli.loads(path.read_text()) if path.exists() else {}
    except tomli.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML ({exc}); it was left as it is") from None
    links = doc.setdefault("superlink", {})
    if not isinstance(links, dict):
        raise ValueError(f"{path}: 'superlink' is not a table; it was left as it is")
    if links.get(name) not in (None, entry) and not overwrite:
        raise ValueError(f"{path} already has a connection '{name}' ({links[name]}); pass --overwrite to replace it")
    links[name] = entry
    links["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(doc))
    return path


def as_deployment(exp):
    """``exp`` as a Flower deployment run (``runtime.backend: flower``, ``runtime.flower.mode:
    deployment``), validated again: what ``submit`` sends, whatever backend the file names
    (the documented ``fedfm flower submit examples/quickstart.yaml`` names none). A setting
    the deployment cannot run (e.g. ``runtime.transport: processes``) is refused here, by
    name, before anything is sent."""
    from fedfm.config import from_dict

    if exp.runtime.backend == "flower" and exp.runtime.flower.mode == "deployment":
        return exp
    raw = exp.dump()
    raw["runtime"]["backend"] = "flower"
    raw["runtime"]["flower"]["mode"] = "deployment"
    return from_dict(raw, "the experiment as a Flower deployment (runtime.backend flower, runtime.flower.mode deployment)")


def run_config_file(exp, out: str | Path, path: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """The run-config overrides (TOML) that carry the experiment to every node."""
    import tomli_w

    from fedfm.runtime.flower.payload import experiment_text

    exp = as_deployment(exp)
    if exp.data.path and Path(exp.data.path).expanduser().exists():
        exp = exp.model_copy(deep=True)
        exp.data.path = str(Path(exp.data.path).expanduser().resolve())  # the ServerApp runs elsewhere
    if exp.runtime.flower.nodes:  # the ServerApp gets the bound keys themselves, not paths on this machine
        from fedfm.runtime.flower.node_keys import key_text

        exp = exp.model_copy(deep=True)
        exp.runtime.flower.nodes = {cid: key_text(v) for cid, v in exp.runtime.flower.nodes.items()}
    path = Path(path)
    body = {"experiment": experiment_text(exp), "out": str(Path(out).resolve()), "resume": bool(resume), "overwrite": bool(overwrite)}
    path.write_text(tomli_w.dumps(body))
    return path


def submit_command(exp, out: str | Path, superlink: str | None, run_config: str | Path, app_dir: str | Path | None = None, stream: bool = True) -> list[str]:
    app = str(Path(app_dir or exp.runtime.flower.app_dir or APP_DIR).resolve())
    cmd = [flower_bin("flwr"), "run", app]
    if superlink:
        cmd.append(superlink)
    cmd += ["--run-config", str(run_config)]
    if stream:
        cmd.append("--stream")
    return cmd


FAILED_MARKS = ("ServerApp raised an exception", "Exit Code: ")


def run_failure(output: str) -> str | None:
    """Why a streamed ``flwr run`` failed, from its output (None: it did not): the exception
    line of the ServerApp's last traceback, else Flower's exit-code line."""
    if not any(mark in output for mark in FAILED_MARKS):
        return None
    lines = [line.rstrip() for line in output.splitlines()]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    if starts:
        after = [line for line in lines[starts[-1] + 1:] if line and not line[0].isspace()]
        if after:
            return _short_exception(after[0])
    codes = [line for line in lines if "Exit Code: " in line]
    return f"Flower exit code {codes[-1].split('Exit Code: ', 1)[1]}" if codes else "the ServerApp raised an exception"


def _short_exception(line: str) -> str:
    """``pkg.module.SomeError: message`` -> ``SomeError: message``."""
    name, _, message = line.partition(": ")
    return f"{name.rsplit('.', 1)[-1]}: {message}"


class TracebackFilter:
    """Drops the indented frames of a traceback from streamed output, keeping its
    ``Traceback`` header and its exception line: a user mistake reads as one message."""

    def __init__(self):
        self.inside = False

    def __call__(self, line: str) -> str | None:
        if line.startswith("Traceback (most recent call last)"):
            self.inside = True
            return "Traceback (frames left out; the exception follows):\n"
        if self.inside and (line[:1].isspace() or not line.strip()):
            return None
        self.inside = False
        return line


def print_line(line: str) -> None:
    sys.stdout.write(line)
    sys.stdout.flush()


def run_streamed(cmd: list[str], env: dict[str, str], timeout: float | None, echo: Callable[[str], Any] | None) -> subprocess.CompletedProcess:
    """Run ``cmd``, passing each output line (tracebacks' frames left out) to ``echo`` as it
    comes; the same lines are in ``stdout``. Past ``timeout`` the process (and its
    children) is stopped and ``subprocess.TimeoutExpired`` raised."""
    import threading

    from fedfm.runtime.flower.loopback import stop_process

    lines: list[str] = []  # what was shown: a traceback's frames are left out here too
    shown = TracebackFilter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")

    def pump() -> None:
        for line in proc.stdout:
            kept = shown(line)
            if kept is not None:
                lines.append(kept)
                if echo is not None:
                    echo(kept)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc, grace=5)
        reader.join(5)
        raise subprocess.TimeoutExpired(cmd, timeout, output="".join(lines)) from None
    reader.join(30)
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(lines), "")


def submit(exp, out: str | Path, superlink: str | None = None, app_dir: str | Path | None = None, env: dict[str, str] | None = None,
           timeout: float | None = None, resume: bool = False, overwrite: bool = False, echo: Callable[[str], Any] | None = print_line) -> subprocess.CompletedProcess:
    """``flwr run`` the experiment on a running SuperLink and wait for it (``--stream``),
    each line of its output passed to ``echo`` as it comes (None: kept quiet). The SuperLink
    is always named (``superlink`` or ``runtime.flower.superlink``): without a name ``flwr``
    would use its own default connection (in Flower 1.42 a local simulation SuperLink it
    starts, that installs the app's dependencies from the network). ``flwr run`` exits 0
    even when the ServerApp failed; such a run is returned with returncode 1 (``run_failure``
    says why)."""
    link = superlink or exp.runtime.flower.superlink
    if not link:
        raise ValueError("no SuperLink named: pass --superlink NAME or set runtime.flower.superlink "
                         "(add a connection with `fedfm flower connection NAME ADDRESS --root-certificates CA`)")
    exp = as_deployment(exp)
    from fedfm.runtime.flower.node_keys import key_problem

    problem = key_problem(exp.runtime.flower.nodes)  # here, not in the ServerApp after the upload
    if problem is not None:
        raise ValueError(problem)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    rc_path = run_config_file(exp, out, out / "flower-run-config.toml", resume, overwrite)
    cmd = submit_command(exp, out, link, rc_path, app_dir)
    done = run_streamed(cmd, flower_env(env), timeout, echo)
    if done.returncode == 0 and run_failure(done.stdout):
        done.returncode = 1
    return done

