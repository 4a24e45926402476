"""HOW THE SERVER COMBINES: aggregation rules, the server pipeline's steps, the server
halves of client algorithms (FedDyn, SCAFFOLD) and server optimizers."""

from fedfm.aggregators.base import aggregators, apply_delta, register_aggregator
from fedfm.aggregators.fedavg import fedavg
from fedfm.aggregators.median import coordinate_median
from fedfm.aggregators.pipeline import Pipeline, register_server_step, server_steps
from fedfm.aggregators.server_opt import register_server_optimizer, server_optimizers
from fedfm.aggregators.server_part import ServerPartBase, build_server_part, register_server_part, server_parts
from fedfm.aggregators import clip, feddyn, scaffold  # noqa: F401  (register steps and server parts)
from fedfm.aggregators import bulyan, centered_clip, clipped_clustering, fedfa, geomed, history_clip, krum, norm_bound  # noqa: F401  (robust rules and steps)
from fedfm.aggregators import trimmed_mean  # noqa: F401  (robust rule)
from fedfm.aggregators import zo_payload, fedkseed, fedbpt  # noqa: F401  (non_state_payload step, FedKSeed and FedBPT server halves)
from fedfm.aggregators import sim_clock  # noqa: F401  (registers sim_clock)
from fedfm.aggregators import fedra, flexlora, hetlora  # noqa: F401  (server halves of heterogeneous clients)
from fedfm.aggregators import splitfed  # noqa: F401  (server part of learner splitfed)
from fedfm.aggregators import flash, prunefl  # noqa: F401  (server parts of learners flash and prunefl)

__all__ = [
    "Pipeline",
    "ServerPartBase",
    "aggregators",
    "apply_delta",
    "build_server_part",
    "coordinate_median",
    "fedavg",
    "register_aggregator",
    "register_server_optimizer",
    "register_server_part",
    "register_server_step",
    "server_optimizers",
    "server_parts",
    "server_steps",
]
