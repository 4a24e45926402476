"""WHERE IT RUNS: the round loop, client sampling, and the backends (local)."""

from fedfm.runtime.algorithm import Algorithm
from fedfm.runtime.local import LocalRuntime, run_local, sample_clients
from fedfm.runtime.store import ClientStore
from fedfm.runtime.workbench import Workbench

__all__ = ["Algorithm", "ClientStore", "LocalRuntime", "Workbench", "run_local", "sample_clients"]
