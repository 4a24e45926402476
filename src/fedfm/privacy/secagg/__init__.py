"""Secure aggregation (Bonawitz et al. 2017): fixed-point encoding, Shamir sharing, the
X25519/HKDF/ChaCha20 primitives and the four phases as pure client/server functions.
Running the phases as the messages of a round needs multi-phase support in the round
loop (docs/privacy.md)."""

from fedfm.privacy.secagg.protocol import SecAggClient, SecAggConfig, SecAggError, SecAggServer, default_threshold

__all__ = ["SecAggClient", "SecAggConfig", "SecAggError", "SecAggServer", "default_threshold"]
