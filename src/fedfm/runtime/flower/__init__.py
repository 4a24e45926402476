"""The Flower backend: fedfm's Algorithm on Flower's simulation and deployment runtimes.

Flower (https://flower.ai, Beutel et al. 2020, "Flower: A Friendly Federated Learning
Research Framework") moves the messages; fedfm keeps the algorithm. The ServerApp
(``server_app``) calls ``configure`` and ``aggregate`` and writes the same run outputs as
the local backend; the ClientApp (``client_app``) calls ``local_update`` and the codec
chains. What crosses Flower is fedfm's encoded bytes (``payload``), so the byte counts are
the same on every backend.

Nothing here is imported by the core: ``fedfm.cli`` imports this package lazily when
``runtime.backend`` is ``flower``, and only these modules import ``flwr``.
"""

FLOWER_EXTRA_HINT = "the Flower backend needs the 'flower' extra: pip install 'fedfm[flower]'"


def require_flwr() -> None:
    """Raise a clear error when ``flwr`` is not installed."""
    import importlib.util

    if importlib.util.find_spec("flwr") is None:
        raise ImportError(FLOWER_EXTRA_HINT)
