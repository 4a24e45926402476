"""Stochastic uniform quantization of what travels: unbiased stochastic rounding onto
evenly spaced levels between -max|x| and +max|x| of each tensor or block.

This is not QSGD (Alistarh, Grubic, Li, Tomioka and Vojnovic 2017, "QSGD:
Communication-Efficient SGD via Gradient Quantization and Encoding"), which sends the
vector's l2 norm, each entry's sign and a stochastically rounded ``|x_i| / ||x||_2`` on
``s`` levels in [0, 1], then Elias-codes the result. Here there is no norm/sign split and
no entropy coding: the scale is ``max |x|`` and the codes are fixed-width. What the two
share is the unbiased stochastic rounding between two neighbouring levels.

Each floating tensor is cut into blocks of ``block`` entries (``block: null``: one block
per tensor). A block with scale ``m = max |x|`` is mapped onto ``L = 2**bits`` evenly
spaced levels ``-m + c * s`` with ``s = 2m / (L - 1)``, ``c`` in ``0..L-1``. Rounding is
stochastic: ``c = floor((x + m) / s + u)``, ``u ~ U[0, 1)``, so ``E[x_hat] = x`` exactly
(unbiased), ``|x_hat - x| < s`` and ``Var[x_hat] <= s**2 / 4`` per entry. The number of
levels is even, so 0 is not a level: a zero entry decodes to ``+-s/2`` (zero on average).
``stochastic: false`` rounds to the nearest level instead (biased, ``|x_hat - x| <=
s/2``). The noise comes from a torch.Generator seeded by (seed, round, client, direction,
tensor name): runs are reproducible. tests/test_codec_tolerances.py checks these bounds.

Codes are bit-packed (codecs/packing.py): ``t`` becomes ``t.__q`` (ceil(n*bits/8) uint8)
and ``t.__scale`` (one float32 per block); meta ``t.__q`` = ``"<n>,<dtype>,<shape>"``. Any
floating tensor is quantized, dense or the ``.__values`` of a sparsifier, so
``[topk, quantize]`` quantizes only the kept values.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from fedfm.codecs.base import CodecContext, CodecError, Payload, StageParams, register_codec
from fedfm.codecs.layout import DTYPE_NAMES, DTYPES, tensor_generator
from fedfm.codecs.packing import pack_bits, unpack_bits

Q, SCALE = ".__q", ".__scale"
QUANT_SALT = 0x9E37


class QuantizeParams(StageParams):
    primary = "bits"
    bits: Literal[1, 2, 4, 8] = Field(8, description="bits per entry")
    block: int | None = Field(None, ge=1, description="entries per scale; null: one scale per tensor")
    stochastic: bool = Field(True, description="unbiased stochastic rounding (else nearest level)")


def _blocks(x: torch.Tensor, block: int | None) -> torch.Tensor:
    n = x.numel()
    b = block or max(n, 1)
    nb = -(-n // b) if n else 0
    padded = torch.zeros(nb * b, dtype=torch.float32)
    padded[:n] = x.reshape(-1).float()
    return padded.view(nb, b)  # (nb, b)


def quantize(x: torch.Tensor, bits: int, block: int | None, gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) floats -> (codes (n,) uint8, scales (nb,) float32). ``gen`` None: nearest level."""
    blocks = _blocks(x, block)  # (nb, b)
    levels = (1 << bits) - 1
    m = blocks.abs().amax(dim=1)  # (nb,)
    step = torch.where(m > 0, 2 * m / levels, torch.ones_like(m))  # (nb,)
    y = (blocks + m.unsqueeze(1)) / step.unsqueeze(1)  # (nb, b) in [0, levels]
    if gen is None:
        c = torch.round(y)
    else:
        c = torch.floor(y + torch.rand(y.shape, generator=gen))
    codes = c.clamp_(0, levels).to(torch.uint8).reshape(-1)[: x.numel()]  # (n,)
    return codes, m


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int | None, n: int) -> torch.Tensor:
    """(n,) codes + (nb,) scales -> (n,) float32."""
    b = block or max(n, 1)
    nb = scales.numel()
    padded = torch.zeros(nb * b, dtype=torch.float32)
    padded[:n] = codes.float()
    step = 2 * scales / ((1 << bits) - 1)  # (nb,)
    x = -scales.unsqueeze(1) + padded.view(nb, b) * step.unsqueeze(1)  # (nb, b)
    return x.reshape(-1)[:n]


class Quantize:
    name = "quantize"

    def __init__(self, params: QuantizeParams):
        self.params = params

    def encode(self, payload: Payload, ctx: CodecContext) -> Payload:
        p = self.params
        out: dict[str, torch.Tensor] = {}
        meta = dict(payload.meta)
        for key, t in payload.tensors.items():
            if not t.is_floating_point() or key.endswith(SCALE):
                out[key] = t
                continue
            gen = tensor_generator(ctx, QUANT_SALT, key) if p.stochastic else None
            codes, scales = quantize(t.reshape(-1), p.bits, p.block, gen)
            out[key + Q] = pack_bits(codes, p.bits)
            out[key + SCALE] = scales
            meta[key + Q] = f"{t.numel()},{DTYPE_NAMES.get(t.dtype, 'F32')},{'x'.join(map(str, t.shape))}"
        return Payload(out, meta)

    def decode(self, payload: Payload, ctx: CodecContext) -> Payload:
        p = self.params
        out = {k: v for k, v in payload.tensors.items() if not (k.endswith(Q) or k.endswith(SCALE))}
        meta = dict(payload.meta)
        for key in [k for k in payload.tensors if k.endswith(Q)]:
            name = key[: -len(Q)]
            n, dtype, shape = _parse_meta(key, meta.pop(key, None))
            scales = payload.tensors.get(name + SCALE)
            if scales is None or scales.dtype != torch.float32 or scales.dim() != 1:
                raise CodecError(f"'{name}{SCALE}' is missing or not a 1-D float32 tensor")
            nb = (-(-n // (p.block or max(n, 1)))) if n else 0
            if scales.numel() != nb:
                raise CodecError(f"'{name}{SCALE}' has {scales.numel()} scales, expected {nb} (corrupted payload)")
            if not torch.isfinite(scales).all() or (scales < 0).any():
                raise CodecError(f"'{name}{SCALE}' holds negative or non-finite scales (corrupted payload)")
            codes = unpack_bits(payload.tensors[key], p.bits, n)
            out[name] = dequantize(codes, scales, p.bits, p.block, n).to(dtype).reshape(shape)
        return Payload(out, meta)


def _parse_meta(key: str, text: str | None) -> tuple[int, torch.dtype, tuple[int, ...]]:
    try:
        count, dtype, shape = (text or "").split(",")
        n = int(count)
        dims = tuple(int(d) for d in shape.split("x")) if shape else ()
        if n < 0 or torch.Size(dims).numel() != n:
            raise ValueError
        return n, DTYPES[dtype], dims
    except (ValueError, KeyError):
        raise CodecError(f"quantized entry '{key}' has no valid '<count>,<dtype>,<shape>' metadata (got {text!r})") from None


register_codec("quantize", Quantize, QuantizeParams)
