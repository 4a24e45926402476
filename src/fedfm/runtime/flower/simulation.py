"""``runtime.flower.mode: simulation``: the experiment on Flower's Ray simulation runtime.

``run_flower_simulation`` starts one virtual SuperNode per fedfm client (node config
``partition-id`` = client id), runs the ServerApp in this process and the ClientApps in
Ray actors of ``runtime.flower.num_cpus`` / ``num_gpus`` each. Actors are long-lived, so
each keeps its loaded base model across rounds (``session``).

Before Flower or Ray is imported, telemetry and update checks are switched off
(``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_DISABLE_UPDATE_CHECK=1``, ``RAY_USAGE_STATS_ENABLED=0``);
a variable the user already set is left as it is.

It uses ``flwr.simulation.run_simulation``, Flower's in-process entry point (marked
deprecated in 1.42 in favour of ``flwr run`` against a simulation SuperLink, which the
shipped app also supports: see docs/distributed.md).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
}


def quiet_flower_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Telemetry and update checks off, unless the caller already chose."""
    target = os.environ if env is None else env
    for key, value in QUIET_ENV.items():
        target.setdefault(key, value)
    return target


def backend_config(exp) -> dict[str, Any]:
    cfg = exp.runtime.flower
    return {
        "client_resources": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        "init_args": {"logging_level": logging.INFO if cfg.verbose else logging.WARNING, "log_to_driver": cfg.verbose},
    }


def resource_problems(exp, cpus: int | None = None, gpus: int | None = None) -> list[str]:
    """What keeps Ray from placing even one virtual client on this machine: Flower would
    stop with "ActorPool is empty" from deep inside its runtime (and the run would wait
    for nodes that never come), so it is refused by name before anything starts."""
    cfg = exp.runtime.flower
    if cpus is None:
        cpus = os.cpu_count() or 1
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out = []
    if cfg.num_cpus > cpus:
        out.append(f"runtime.flower.num_cpus {cfg.num_cpus:g}: this machine has {cpus} CPU core(s); Ray could not place "
                   f"one virtual client (use at most {cpus})")
    if cfg.num_gpus > gpus:
        have = f"{gpus} CUDA GPU(s)" if gpus else "no CUDA GPU"
        out.append(f"runtime.flower.num_gpus {cfg.num_gpus:g}: this machine has {have}; Ray could not place one virtual "
                   f"client (use {'0, the default' if not gpus else f'at most {gpus}'})")
    if exp.runtime.device == "cuda" and cfg.num_gpus == 0:
        out.append("runtime.device cuda: a virtual client sees only the GPUs runtime.flower.num_gpus gives it (Ray hides "
                   "the others), and that is 0; set runtime.flower.num_gpus (e.g. 1, or 0.5 for two clients per GPU)")
    return out


def run_flower_simulation(exp, out: str | Path, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run ``exp`` on the Ray simulation runtime; returns the run summary. ``resume``
    continues the run in ``out`` from its last checkpoint, as on the local backend."""
    from fedfm.runtime.flower import require_flwr

    require_flwr()
    problems = resource_problems(exp)
    if problems:
        raise ValueError("; ".join(problems))
    quiet_flower_env()
    if exp.runtime.threads:
        # Ray actors inherit the driver's environment: cap the BLAS/OpenMP pools as well.
        os.environ.setdefault("OMP_NUM_THREADS", str(exp.runtime.threads))
    from flwr.simulation import run_simulation

    from fedfm.runtime.flower.client_app import make_client_app
    from fedfm.runtime.flower.payload import experiment_text
    from fedfm.runtime.flower.server_app import make_server_app

    out = Path(out).resolve()
    settings = {"experiment": experiment_text(exp), "out": str(out), "resume": resume, "overwrite": overwrite}
    result: dict[str, Any] = {}
    stop = threading.Event()  # set if the runtime crashes: the ServerApp thread stops waiting for replies
    try:
        run_simulation(
            server_app=make_server_app(settings, result, stop=stop),
            client_app=make_client_app(settings),
            num_supernodes=exp.federation.clients,
            backend_config=backend_config(exp),
            verbose_logging=exp.runtime.flower.verbose,
        )
    except KeyboardInterrupt:  # Ctrl-C: the ServerApp thread stops waiting too, the caller says how to resume
        stop.set()
        raise
    except Exception as exc:
        stop.set()
        cause = exc
        while cause.__cause__ is not None:  # Flower wraps the runtime's error twice: name the first one
            cause = cause.__cause__
        raise RuntimeError(f"the Flower simulation runtime stopped: {type(cause).__name__}: {cause} (see the log above)") from None
    if "summary" not in result:
        raise RuntimeError("the Flower simulation ended without a result; see the log above")
    return result["summary"]
