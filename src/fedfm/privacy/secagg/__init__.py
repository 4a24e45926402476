"""Secure aggregation (Bonawitz et al. 2017): fixed-point encoding, Shamir sharing, the
X25519/HKDF/ChaCha20 primitives, the four phases as pure client/server functions
(``protocol.py``), and the same protocol as exchange phases of real rounds
(``exchange.py``, YAML ``exchanges: [{name: secagg, ...}]``; ``mask.py`` masks the
client's update through the phases' ``on_train_reply`` hook). The ``cryptography`` package (extra ``privacy``) is imported only when
secure aggregation runs."""

from fedfm.privacy.secagg import exchange  # noqa: F401  (registers the secagg exchange)

_LAZY = ("SecAggClient", "SecAggConfig", "SecAggError", "SecAggServer", "default_threshold")


def __getattr__(name: str):
    if name in _LAZY:
        from fedfm.privacy.secagg import protocol

        return getattr(protocol, name)
    raise AttributeError(name)


__all__ = list(_LAZY)
