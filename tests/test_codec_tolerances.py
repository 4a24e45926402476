"""Each lossy chain within the error bound derived from what it does, entry by entry.

Bounds (``x`` the sent entry, ``x_hat`` what the receiver decodes; float32 input):

- ``quantize: b`` (codecs/quantize.py): a block with ``m = max |x|`` is mapped onto the
  ``L = 2**b`` symmetric levels ``-m + c s``, ``s = 2m / (L - 1)`` (8 bits: ``s = 2m/255``).
  Stochastic rounding picks one of the two levels around ``x``: ``|x_hat - x| < s``; the
  nearest level (``stochastic: false``): ``|x_hat - x| <= s/2``. ``m`` is per tensor, or
  per block of ``block`` entries (so a block of small entries gets a small step).
- ``bf16``: round to nearest with 8 significand bits: ``|x_hat - x| <= 2**-8 |x|``.
- ``fp16``: 11 significand bits: ``|x_hat - x| <= 2**-11 |x|`` for normal values
  (``|x| >= 2**-14``); below that the spacing is ``2**-24``, so ``|x_hat - x| <= 2**-25``.
- ``[quantize: 8, bf16]``: the codes travel as they are, the scale ``m`` in bf16, so
  ``x_hat = m' (2c/255 - 1)`` with ``|m' - m| <= 2**-8 m``: ``|x_hat - x| < s + 2**-8 m``.
- ``[fp16, quantize: 8]``: quantize the fp16 values, and the decoded entries are fp16
  again: ``|x_hat - x| <= 2**-11 |x| + s16 + 2**-11 (|x| + s16)`` with ``m16 <= m (1 + 2**-11)``.
- ``[topk, quantize: 8]``: kept entries within ``s`` of the tensor's ``m`` (top-k keeps the
  largest), the others decode to exactly 0 (within ``s`` of 0 for a tensor so small that
  its dense form, zeros included, is the cheapest and is quantized whole).

Each bound gets a few float32 ulps of ``m`` for the arithmetic of quantize/dequantize.
"""

from __future__ import annotations

import pytest
import torch

from fedfm.codecs import CodecChain, CodecContext
from fedfm.runtime.store import ClientStore

EPS32 = torch.finfo(torch.float32).eps
SHAPES = {
    "enc.layer.0.query.lora_A.weight": (8, 32),
    "enc.layer.0.query.lora_B.weight": (32, 8),
    "enc.layer.1.output.dense.weight": (64, 48),
    "head.bias": (2,),
}
REF = {k: torch.zeros(s) for k, s in SHAPES.items()}


def update(seed: int = 0) -> dict[str, torch.Tensor]:
    """Gaussian entries whose scale varies by 10x between consecutive runs of 16 entries
    (so per-block scales matter), plus a few exact zeros."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in SHAPES.items():
        n = torch.Size(shape).numel()
        scale = 10.0 ** (torch.arange(n) // 16 % 3 - 1).float()  # 0.1, 1, 10, 0.1, ...
        x = torch.randn(n, generator=g) * scale
        x[::97] = 0.0
        out[k] = x.view(shape)
    return out


def round_trip(specs, x, tmp_path, seed=0):
    chain = CodecChain.from_specs(specs, "codecs.up")
    ctx = CodecContext("up", 1, 3, REF, seed=seed, store=ClientStore(tmp_path))
    enc = chain.encode(x, {}, ctx)
    state, _ = chain.decode(enc.data, ctx)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in REF.items()}
    assert all(v.dtype == torch.float32 for v in state.values())
    return state, enc


def block_max(x: torch.Tensor, block: int | None) -> torch.Tensor:
    """max |x| of the block each entry belongs to, shaped like ``x``."""
    flat = x.reshape(-1).abs()
    n = flat.numel()
    b = block or n
    nb = -(-n // b)
    padded = torch.zeros(nb * b)
    padded[:n] = flat
    m = padded.view(nb, b).amax(dim=1)  # (nb,)
    return m.repeat_interleave(b)[:n].view_as(x)


def step(m: torch.Tensor, bits: int) -> torch.Tensor:
    return 2 * m / ((1 << bits) - 1)


def assert_within(got: torch.Tensor, x: torch.Tensor, bound: torch.Tensor, name: str) -> float:
    err = (got - x).abs()
    excess = float((err - bound).max())
    assert excess <= 0, f"{name}: error exceeds the bound by {excess:.3e}"
    return float((err / bound.clamp_min(1e-30)).max())


def ulps(m: torch.Tensor) -> torch.Tensor:
    return 4 * EPS32 * m


# -- quantize ------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("block", [None, 16, 64])
def test_stochastic_quantize_within_one_step_of_its_block(tmp_path, bits, block):
    x = update(bits)
    got, _ = round_trip([{"quantize": bits, "block": block}], x, tmp_path)
    worst = 0.0
    for k in x:
        m = block_max(x[k], block)
        worst = max(worst, assert_within(got[k], x[k], step(m, bits) + ulps(m), k))
    assert worst > 0.5  # the bound is tight: stochastic rounding does use nearly the whole step


@pytest.mark.parametrize("block", [None, 16])
def test_nearest_quantize_within_half_a_step(tmp_path, block):
    x = update(1)
    got, _ = round_trip([{"quantize": 8, "block": block, "stochastic": False}], x, tmp_path)
    for k in x:
        m = block_max(x[k], block)
        assert_within(got[k], x[k], step(m, 8) / 2 + ulps(m), k)


def test_eight_bit_chain_is_far_tighter_than_the_old_bound(tmp_path):
    """8 bits per tensor: |error| < 2m/255 (0.0078 m), not 0.7 m; per block of 16 the bound
    follows each block's own maximum, 100x smaller on the blocks of small entries here."""
    x = update(2)
    per_tensor, _ = round_trip([{"quantize": 8}], x, tmp_path / "t")
    per_block, _ = round_trip([{"quantize": 8, "block": 16}], x, tmp_path / "b")
    for k in x:
        m = x[k].abs().max()
        assert (per_tensor[k] - x[k]).abs().max() < 2 * m / 255 + ulps(m)
        small = block_max(x[k], 16) < m / 20  # blocks of the 0.1-scale entries
        if small.any():
            err_t = (per_tensor[k] - x[k]).abs()[small].max()
            err_b = (per_block[k] - x[k]).abs()[small].max()
            assert err_b < err_t / 10, k


def test_stochastic_quantize_is_unbiased_on_average(tmp_path):
    """E[x_hat] = x and Var <= s^2/4 per entry: the mean error over n entries has standard
    deviation <= s / (2 sqrt(n)); it stays within 5 of those (seeded, so deterministic)."""
    x = {k: torch.full(s, 0.3) for k, s in SHAPES.items()}
    x = {k: v.reshape(-1).index_fill(0, torch.tensor([0]), 1.0).view(SHAPES[k]) for k, v in x.items()}
    got, _ = round_trip([{"quantize": 4}], x, tmp_path)
    for k in x:
        n = x[k].numel()
        if n < 100:
            continue
        s = step(torch.tensor(1.0), 4)
        mean_err = float((got[k] - x[k]).mean())
        assert abs(mean_err) <= 5 * float(s) / (2 * n**0.5), k


# -- half precision ------------------------------------------------------------------


def test_bf16_chain_relative_error_at_most_2_to_the_minus_8(tmp_path):
    x = update(3)
    got, enc = round_trip([{"bf16": True}], x, tmp_path)
    worst = 0.0
    for k in x:
        worst = max(worst, assert_within(got[k], x[k], 2.0**-8 * x[k].abs(), k))
        assert torch.equal(got[k][x[k] == 0], x[k][x[k] == 0])
    assert worst > 0.5  # bf16, not a wider format: the bound is nearly reached
    assert enc.stage_bytes["bf16"] < 0.6 * enc.stage_bytes["input"]


def test_fp16_chain_relative_error_at_most_2_to_the_minus_11(tmp_path):
    x = update(4)
    tiny = {"head.bias": torch.tensor([3e-6, -1e-7])}  # subnormal in fp16
    x.update(tiny)
    got, _ = round_trip([{"fp16": True}], x, tmp_path)
    worst = 0.0
    for k in x:
        normal = x[k].abs() >= 2.0**-14
        bound = torch.where(normal, 2.0**-11 * x[k].abs(), torch.full_like(x[k], 2.0**-25))
        assert_within(got[k], x[k], bound, k)
        ratio = ((got[k] - x[k]).abs() / bound)[normal & (x[k] != 0)]
        if ratio.numel():
            worst = max(worst, float(ratio.max()))
    assert worst > 0.5  # fp16, not a wider format: the bound is nearly reached


def test_eight_bit_with_bf16_scales(tmp_path):
    x = update(5)
    got, _ = round_trip([{"quantize": 8}, {"bf16": True}], x, tmp_path)
    for k in x:
        m = x[k].abs().max()
        assert_within(got[k], x[k], step(m, 8) + 2.0**-8 * m + ulps(m), k)


def test_fp16_then_eight_bit(tmp_path):
    x = update(6)
    got, _ = round_trip([{"fp16": True}, {"quantize": 8}], x, tmp_path)
    for k in x:
        m16 = x[k].abs().max() * (1 + 2.0**-11)
        s16 = step(m16, 8)
        bound = 2.0**-11 * x[k].abs() + s16 + 2.0**-11 * (x[k].abs() + s16) + 2.0**-25 + ulps(m16)
        assert_within(got[k], x[k], bound, k)


# -- sparsify + quantize -------------------------------------------------------------


def test_topk_then_eight_bit_kept_within_a_step_dropped_exactly_zero(tmp_path):
    x = update(7)
    got, _ = round_trip([{"topk": 0.25}, {"quantize": 8}], x, tmp_path)
    for k in x:
        flat, out = x[k].reshape(-1), got[k].reshape(-1)
        n = flat.numel()
        kcount = max(1, min(n, int(0.25 * n + 0.5)))
        kept = torch.zeros(n, dtype=torch.bool)
        kept[torch.topk(flat.abs(), kcount).indices] = True
        m = flat.abs().max()
        assert_within(out[kept], flat[kept], step(m, 8) + ulps(m), k)
        # Dropped entries: exactly 0 when the tensor travels sparse; a tensor small enough
        # to travel dense (zeros included) has its zeros quantized too, within a step of 0.
        assert_within(out[~kept], torch.zeros(n - kcount), step(m, 8) + ulps(m), k)
        if n >= 256:
            assert torch.equal(out[~kept], torch.zeros(n - kcount)), k
