"""HOW THE SERVER COMBINES: aggregation rules and server-side updates."""

from fedfm.aggregators.base import aggregators, apply_delta, register_aggregator
from fedfm.aggregators.fedavg import fedavg

__all__ = ["aggregators", "apply_delta", "fedavg", "register_aggregator"]
