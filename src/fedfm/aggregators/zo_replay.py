"""Seeded perturbation directions and their replay, shared by both halves of the
zeroth-order algorithms (MeZO, Malladi et al. 2023, "Fine-Tuning Language Models with Just
Forward Passes"; FedKSeed, Qin et al. 2024, "Federated Full-Parameter Tuning of Billion-Sized
Language Models with Communication Cost under 18 Kilobytes").

A direction ``z`` over a State is never stored: the tensor of the parameter with index ``i``
(in the sorted State names) is drawn from its own ``torch.Generator`` seeded with
``derive_seed(seed, ZO_TAG, i)``, one tensor at a time, whenever it is needed. So the
client that perturbs, the client that applies an update and the server that replays a
history all regenerate the same numbers from the seed alone.

Across machines: the numbers are drawn in float64 and rounded to float32
(``standard_normal``). A float32 ``torch.randn`` is not portable: its vectorised kernel
(chosen by the CPU, AVX2 or AVX-512) gives other numbers than the scalar one (1,572 of
4,096 entries differ between ``ATEN_CPU_CAPABILITY=default`` and AVX-512, measured),
while the float64 draw is the same at every x86 SIMD level (tested in two processes,
``ATEN_CPU_CAPABILITY=default`` against the machine's own; AVX2 against AVX-512 by
the same kernel). The arithmetic on the directions avoids ``add_(z, alpha=c)``, whose
vectorised kernel fuses the multiply and the add (one rounding) where the scalar one
rounds twice (14,470 of 70,001 entries differ, measured): it is ``add_(z.mul_(c))``, two
correctly rounded operations whatever the kernel. Not tested on ARM (NEON) CPUs, nor
across torch versions: a deployment over other CPUs should check that ``param_noise`` and
``replay`` give the same bytes on each.

FedKSeed's model after round ``r`` is ``w_r = w_{r-1} + D(c_r)`` with ``c_r`` the row of
per-seed coefficients of that round (``-lr`` times the example-weighted sum of the clients'
projected gradients per seed) and ``D(c) = sum_k c_k z(pool_k)`` accumulated in ascending
seed order (``round_delta``). ``replay`` applies rows in order with exactly the operation
the server optimizer ``sgd`` (lr 1.0) uses, so a client that replays the history from the
base model holds the server's model bit for bit (on x86 CPUs of any SIMD level, as above).
"""

from __future__ import annotations

import torch

from fedfm.core.seeding import derive_seed
from fedfm.core.types import State

ZO_TAG = 0x2E0
POOL_TAG = 0xF5EED


CHUNK = 1 << 16  # entries drawn in float64 at a time (512 KB)


def standard_normal(shape, generator: torch.Generator) -> torch.Tensor:
    """N(0, 1) of ``shape``, float32, CPU: drawn in float64 from ``generator``, ``CHUNK``
    entries at a time in order, each chunk rounded to float32. ATen's float32 normal
    kernel has a vectorised (AVX2, AVX-512) path whose numbers differ from its scalar one,
    so a float32 draw depends on the CPU; the float64 kernel gives the same numbers at every
    x86 SIMD level, and the rounding to float32 is exact arithmetic."""
    out = torch.empty(tuple(shape), dtype=torch.float32)
    flat = out.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        stop = min(start + CHUNK, flat.numel())
        flat[start:stop] = torch.randn(stop - start, generator=generator, dtype=torch.float64)
    return out


def param_noise(shape, seed: int, index: int, portable: bool = True) -> torch.Tensor:
    """z for the parameter with ``index`` (sorted State order): N(0, 1), float32, CPU.
    ``portable=False`` draws with torch's float32 kernel: about 4.5x faster, but its
    numbers depend on the CPU's SIMD level (see above), so only for directions that no
    other machine regenerates (MeZO/FedMeZO clients, which send deltas)."""
    g = torch.Generator().manual_seed(derive_seed(seed, ZO_TAG, index))
    if not portable:
        return torch.randn(tuple(shape), generator=g, dtype=torch.float32)
    return standard_normal(shape, g)


def seed_pool(pool_seed: int, size: int) -> list[int]:
    """FedKSeed's K candidate seeds, the same for every client and the server."""
    return [derive_seed(pool_seed, POOL_TAG, k) for k in range(size)]


def round_delta(coefs: torch.Tensor, pool: list[int], shapes: State) -> State:
    """D(c) = sum_k c_k z(pool_k) over the names of ``shapes`` (float32), ascending k,
    skipping zero coefficients."""
    if coefs.ndim != 1 or coefs.numel() != len(pool):
        raise ValueError(f"coefficient row has shape {tuple(coefs.shape)}, expected ({len(pool)},)")
    names = sorted(shapes)
    out = {n: torch.zeros(tuple(shapes[n].shape), dtype=torch.float32) for n in names}
    for k in torch.nonzero(coefs).flatten().tolist():
        c = float(coefs[k])
        for i, n in enumerate(names):
            out[n].add_(param_noise(shapes[n].shape, pool[k], i).mul_(c))  # no fused multiply-add: see module doc
    return out


def apply_delta_like_sgd(state: State, delta: State) -> State:
    """``state + 1.0 * delta`` exactly as the server optimizer ``sgd`` at lr 1.0 computes it."""
    return {k: state[k] + 1.0 * delta[k].to(state[k].dtype) for k in state}


def replay(state: State, history: torch.Tensor, pool: list[int], in_place: bool = False) -> State:
    """Apply the rows of ``history`` ((rounds, K) coefficients) to ``state`` in order,
    bit for bit as the server did (per parameter: ``x + 1.0 * D(c)[x]``, D accumulated in
    ascending seed order). One parameter's ``D`` and one direction tensor are held at a
    time; ``in_place`` updates ``state``'s tensors instead of copies."""
    if history.ndim != 2 or history.shape[1] != len(pool):
        raise ValueError(f"history has shape {tuple(history.shape)}, expected (rounds, {len(pool)})")
    if not in_place:
        state = {k: v.clone() for k, v in state.items()}
    names = sorted(state)
    for row in history:
        seeds = torch.nonzero(row).flatten().tolist()
        for i, n in enumerate(names):
            d = torch.zeros(tuple(state[n].shape), dtype=torch.float32)
            for k in seeds:
                d.add_(param_noise(state[n].shape, pool[k], i).mul_(float(row[k])))
            state[n].add_(1.0 * d.to(state[n].dtype))
    return state
