"""HOW UPDATES TRAVEL: composable encode/decode stages with exact byte counts.

Stages (YAML names): topk, randk, threshold (sparsify, optional error feedback), quantize
(1/2/4/8-bit stochastic, per tensor or per block), cast / fp16 / bf16, delta (downlink
against what the client last received), compact (short framing), checksum (CRC-32).
Importing this package registers them all. See docs/compression.md.
"""

from fedfm.codecs.base import (
    CodecContext,
    CodecError,
    Payload,
    Stage,
    StageParams,
    codecs,
    parse_stage,
    register_codec,
)
from fedfm.codecs.chain import CodecChain, Encoded
from fedfm.codecs.serialize import from_bytes, to_bytes
from fedfm.codecs import cast, compact, downlink, integrity, quantize, sparsify  # noqa: F401  (registers stages)
from fedfm.codecs import skip_zero  # noqa: F401  (registers skip_zero)

__all__ = [
    "CodecChain",
    "CodecContext",
    "CodecError",
    "Encoded",
    "Payload",
    "Stage",
    "StageParams",
    "codecs",
    "from_bytes",
    "parse_stage",
    "register_codec",
    "to_bytes",
]
