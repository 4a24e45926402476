"""WHERE IT RUNS: the one round loop (``loop.py``) over a transport: in-process
(``transport.py``, the local backend in ``local.py``) or Flower's Grid (``flower/``);
the one client function (``client.py``), client sampling, faults, client roles, the
disk-backed client store, checkpoints and resume."""

from fedfm.runtime.algorithm import FedAlgorithm, build_algorithm
from fedfm.runtime.local import LocalRuntime, run_local, sample_clients
from fedfm.runtime.loop import ResumeError, RoundLoop
from fedfm.runtime.store import ClientStore
from fedfm.runtime.workbench import Workbench

__all__ = [
    "ClientStore",
    "FedAlgorithm",
    "LocalRuntime",
    "ResumeError",
    "RoundLoop",
    "Workbench",
    "build_algorithm",
    "run_local",
    "sample_clients",
]
