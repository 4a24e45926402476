"""HOW UPDATES TRAVEL: composable encode/decode stages with exact byte counts."""

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
