"""HOW THE SERVER COMBINES: aggregation rules and server-side updates."""

from fedfm.aggregators.base import aggregators, apply_delta, register_aggregator
from fedfm.aggregators.fedavg import fedavg
from fedfm.aggregators.server_opt import register_server_optimizer, server_optimizers

__all__ = [
    "aggregators",
    "apply_delta",
    "fedavg",
    "register_aggregator",
    "register_server_optimizer",
    "server_optimizers",
]
