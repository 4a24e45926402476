"""What crosses Flower: fedfm's encoded bytes, and the experiment as text.

The codec chains produce bytes (safetensors at the end of every chain); they travel as
one flat ``uint8`` array in an ``ArrayRecord`` so that Flower can chunk big payloads, and
come back out bit for bit. The byte count fedfm reports is ``len()`` of those bytes, as on
the local backend; Flower's own framing (array header, message metadata) is not counted.

The experiment crosses as JSON text in the run config (key ``experiment``): every node
validates it again with ``fedfm.config.from_dict``, so a node with a different fedfm
version that cannot run it fails before loading a model.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

PAYLOAD_KEY = "fedfm.payload"
CONFIG_KEY = "fedfm.config"
METRICS_KEY = "fedfm.metrics"
BYTES_ARRAY = "bytes"


def experiment_text(exp) -> str:
    """The resolved experiment as canonical JSON (what the run config carries)."""
    return json.dumps(exp.dump(), sort_keys=True, separators=(",", ":"))


def experiment_from_text(text: str, source: str = "run config 'experiment'"):
    from fedfm.config import ConfigError, from_dict

    if not text or not text.strip():
        raise ConfigError(f"{source}: empty; pass the experiment with `fedfm flower submit` or --run-config")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not valid JSON: {exc}") from None
    return from_dict(raw, source)


def config_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def bytes_to_record(data: bytes):
    """Encoded bytes -> an ArrayRecord holding one flat uint8 array."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({BYTES_ARRAY: Array(np.frombuffer(data, dtype=np.uint8))})


def record_to_bytes(record, where: str) -> bytes:
    """The inverse of ``bytes_to_record``; ``where`` names the sender in errors."""
    if BYTES_ARRAY not in record:
        raise ValueError(f"{where}: payload record has no '{BYTES_ARRAY}' array")
    arr = record[BYTES_ARRAY].numpy()
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ValueError(f"{where}: payload must be a flat uint8 array, got {arr.dtype} {arr.shape}")
    return arr.tobytes()


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Only finite-typed numeric metrics travel in a MetricRecord."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
