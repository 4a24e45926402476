"""Quantization, casting and bit packing: unbiasedness, exact byte sizes, round trips."""

from __future__ import annotations

import math
import struct
import json

import pytest
import torch

from fedfm.codecs import CodecChain, CodecContext, CodecError, Payload, from_bytes, to_bytes
from fedfm.codecs.packing import narrowest_uint, pack_bits, packed_nbytes, unpack_bits
from fedfm.codecs.quantize import dequantize, quantize


def data_sizes(blob: bytes) -> dict[str, int]:
    """Bytes of each tensor's data region, read from the safetensors header."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000])
def test_bit_packing_round_trips_with_exact_size(bits, n):
    codes = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(n + bits)).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(n * bits / 8) == packed_nbytes(n, bits)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_packing_layout_by_hand():
    # 4-bit codes 1, 2, 3: byte 0 = 1 | 2 << 4 = 33, byte 1 = 3.
    assert pack_bits(torch.tensor([1, 2, 3]), 4).tolist() == [33, 3]
    # 2-bit codes 3, 0, 1, 2 -> 3 | 0<<2 | 1<<4 | 2<<6 = 3 + 16 + 128 = 147.
    assert pack_bits(torch.tensor([3, 0, 1, 2]), 2).tolist() == [147]
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1).tolist() == [129, 1]
    assert narrowest_uint(255) == torch.uint8 and narrowest_uint(256) == torch.uint16
    assert narrowest_uint(70000) == torch.uint32
    with pytest.raises(CodecError, match="expected 2"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 3)


def test_four_bit_payload_takes_half_the_bytes_of_eight_bit():
    ref = {"w": torch.zeros(1000)}
    x = {"w": torch.linspace(-1, 1, 1000)}
    sizes = {}
    for bits in (8, 4, 2, 1):
        chain = CodecChain.from_specs([{"quantize": bits}], "codecs.up")
        blob = chain.encode(x, {}, CodecContext("up", 1, 0, ref)).data
        sizes[bits] = data_sizes(blob)
    assert [sizes[b]["w.__q"] for b in (8, 4, 2, 1)] == [1000, 500, 250, 125]
    assert all(sizes[b]["w.__scale"] == 4 for b in sizes)  # one float32 scale per tensor


def test_stochastic_quantization_is_unbiased():
    """Per entry, x_hat = -m + c*s with s = 2m/(L-1) and c = floor(y + u): E[x_hat] = x and
    Var[x_hat] <= s^2/4. Over N independent draws the mean's standard deviation is at most
    s / (2 sqrt(N)); we allow 5 of them per entry (a Gaussian 5-sigma event, ~6e-7 per entry)."""
    x = torch.linspace(-0.9, 1.0, 64) ** 3  # (64,) uneven values, max |x| = 1
    bits, n_draws = 2, 4000
    m = x.abs().max()
    s = 2 * m / ((1 << bits) - 1)
    tol = 5 * s / (2 * math.sqrt(n_draws))
    # N independent draws at once: N copies of x, one block (hence the same scale m) per copy.
    copies = x.repeat(n_draws)  # (N * 64,)
    codes, scales = quantize(copies, bits, x.numel(), torch.Generator().manual_seed(0))
    assert torch.allclose(scales, torch.full((n_draws,), float(m)))
    draws = dequantize(codes, scales, bits, x.numel(), copies.numel()).view(n_draws, -1)  # (N, 64)
    assert (draws.var(dim=0) <= s**2 / 4 * 1.1).all()  # the variance bound itself (10% sampling slack)
    mean = draws.mean(dim=0)
    assert (mean - x).abs().max() <= tol
    # The same test catches a biased rounding: nearest-level rounding misses by up to s/2.
    codes, scales = quantize(x, bits, None, None)
    assert (dequantize(codes, scales, bits, None, x.numel()) - x).abs().max() > tol


def test_block_quantization_error_bound_and_scales():
    x = torch.cat([torch.full((64,), 1e-3), torch.full((64,), 10.0)]) * torch.linspace(-1, 1, 128)  # (128,)
    codes, scales = quantize(x, 4, 64, torch.Generator().manual_seed(0))
    assert scales.shape == (2,)
    back = dequantize(codes, scales, 4, 64, 128)
    step = 2 * scales / 15  # (2,)
    err = (back - x).abs().view(2, 64)
    assert (err <= step.unsqueeze(1) + 1e-7).all()  # within one level of the block's own grid
    assert err[0].max() < 2e-4  # small block keeps its own fine grid


def test_quantize_corrupted_scale_or_codes_is_a_codec_error():
    ref = {"w": torch.zeros(100)}
    ctx = CodecContext("up", 1, 0, ref)
    chain = CodecChain.from_specs([{"quantize": 4, "block": 10}], "codecs.up")
    payload = from_bytes(chain.encode({"w": torch.randn(100)}, {}, ctx).data)
    bad = Payload(dict(payload.tensors), dict(payload.meta))
    bad.tensors["w.__scale"] = bad.tensors["w.__scale"][:5]
    with pytest.raises(CodecError, match="scales"):
        chain.decode(to_bytes(bad), ctx)
    bad = Payload(dict(payload.tensors), dict(payload.meta))
    bad.tensors["w.__q"] = bad.tensors["w.__q"][:-1]
    with pytest.raises(CodecError, match="bytes"):
        chain.decode(to_bytes(bad), ctx)


def test_seeded_noise_is_reproducible_and_differs_by_client():
    ref = {"w": torch.zeros(256)}
    x = {"w": torch.randn(256, generator=torch.Generator().manual_seed(0))}
    chain = CodecChain.from_specs([{"quantize": 2}], "codecs.up")
    a = chain.encode(x, {}, CodecContext("up", 3, 1, ref, seed=7)).data
    b = chain.encode(x, {}, CodecContext("up", 3, 1, ref, seed=7)).data
    c = chain.encode(x, {}, CodecContext("up", 3, 2, ref, seed=7)).data
    assert a == b and a != c


@pytest.mark.parametrize("spec,dtype", [({"fp16": True}, torch.float16), ({"cast": "bfloat16"}, torch.bfloat16)])
def test_half_casts_halve_the_data_and_decode_to_float32(spec, dtype):
    ref = {"w": torch.zeros(10, 10)}
    x = {"w": torch.randn(10, 10)}
    ctx = CodecContext("up", 1, 0, ref)
    chain = CodecChain.from_specs([spec], "codecs.up")
    enc = chain.encode(x, {}, ctx)
    assert data_sizes(enc.data) == {"w": 200}
    state, _ = chain.decode(enc.data, ctx)
    assert state["w"].dtype == torch.float32
    assert torch.equal(state["w"], x["w"].to(dtype).float())
