"""Secure aggregation (Bonawitz et al. 2017; SecAgg+, Bell et al. 2020): fixed-point
encoding, Shamir sharing, the X25519/HKDF/AES-GCM primitives, and the protocol as exchange
phases of real rounds (``exchange.py``, YAML ``exchanges: [{name: secagg, ...}]``;
``mask.py`` masks the client's update through the phases' ``on_train_reply`` hook,
``unmask.py`` is the server's last step, ``graph.py`` SecAgg+'s neighbours, ``outlook.py``
how often dropouts fail a round). The ``cryptography`` package (extra ``privacy``) is
imported only when secure aggregation runs."""

from fedfm.privacy.secagg import exchange  # noqa: F401  (registers the secagg exchange)
from fedfm.privacy.secagg.common import SecAggError, default_threshold

__all__ = ["SecAggError", "default_threshold"]
