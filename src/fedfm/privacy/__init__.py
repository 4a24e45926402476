"""PRIVACY: client-level DP (clipping, noise, accounting), distributed DP, sample-level
DP-SGD, and secure aggregation (``exchanges: [{name: secagg}]``). See docs/privacy.md."""

from fedfm.privacy import clipping, distributed, dp_sgd, noise  # noqa: F401  (register dp_clip, dp_noise, dp_client_noise, dp_sgd)
from fedfm.privacy import secagg  # noqa: F401  (registers the secagg exchange)
from fedfm.privacy.accounting import Plan, epsilon, solve_noise_multiplier

__all__ = ["Plan", "epsilon", "solve_noise_multiplier"]
