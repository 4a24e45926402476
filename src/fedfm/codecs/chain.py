"""A chain of codec stages, ending in safetensors serialization, with per-stage bytes.

``encode`` serializes the payload before the first stage and after every stage, so
``Encoded.stage_bytes`` holds the exact size of what would travel if the chain stopped
there (``{"input": ..., "topk": ..., "quantize": ...}``); the last one is ``len(data)``.
The chain also keeps running sums of these sizes until ``take_totals()`` reads and
resets them (the runtime writes one sum per round into metrics.jsonl).

``from_specs`` refuses the orders no payload survives (``order_problem``: ``checksum``
last, nothing but ``checksum`` after ``compact``), naming ``codecs.up[i]``.

``decode`` runs the stages in reverse; any failure (truncated or corrupted bytes, a
stage's consistency check, a tensor of the wrong shape) raises ``CodecError``. A decoded
floating tensor is cast to the reference's dtype where that is floating point too (stages
legitimately decode to another float dtype: ``quantize`` to the dtype the sender named,
``fp16``/``bf16`` to float32); any other tensor keeps the dtype it arrived in, so the
server's validation (``runtime/validate.py``, ``check_dtypes``) refuses a bool or integer
tensor where the spec is floating point instead of a cast turning it into numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedfm.codecs.base import CodecContext, CodecError, Payload, Stage, build_stage
from fedfm.codecs.serialize import from_bytes, to_bytes
from fedfm.core.registry import RegistryError
from fedfm.core.types import State


CASTS = ("cast", "fp16", "bf16")  # codecs/cast.py's stage names
SPARSIFIERS = ("topk", "randk", "threshold")  # codecs/sparsify.py's stage names


def order_problem(names: list[str], where: str) -> str | None:
    """Why this order of stage names cannot work, naming ``where[i]``, or None.

    ``checksum`` must be last: it covers what travels, and a stage after it would change
    that (a lossy one makes every payload fail the check). ``compact`` may be followed by
    ``checksum`` only: it renames every entry to a position and concatenates them into one
    flat tensor per dtype, which no other stage can read (``[compact, topk]`` sparsifies
    the flat tensor, and decoding fails to find it in the reference State). One cast stage
    (``fp16``, ``bf16``, ``cast``) at most: a cast turns every float32 tensor to half, so a
    second finds none and does nothing (``[fp16, bf16]`` travels as fp16). One sparsifier
    (``topk``, ``randk``, ``threshold``) at most: the first sends each tensor in a sparse wire
    form under another name, so a second acts only on the tensors the first happened to send
    dense, and ``[randk, topk]`` failed to decode every payload. One ``quantize`` at most
    (``[quantize, fp16, quantize]`` failed to decode every payload).
    """
    casts = [i for i, n in enumerate(names) if n in CASTS]
    if len(casts) > 1:
        i, j = casts[:2]
        return (f"{where}[{j}]: '{names[j]}' after '{names[i]}' ({where}[{i}]) casts nothing: the first cast leaves "
                "no float32 tensor; keep one cast stage")
    quant = [i for i, n in enumerate(names) if n == "quantize"]
    if len(quant) > 1:
        i, j = quant[:2]
        return (f"{where}[{j}]: a second 'quantize' ({where}[{i}] is the first) would quantize the first one's "
                "scales (and after a cast fail to decode every payload); keep one quantize stage")
    sparse = [i for i, n in enumerate(names) if n in SPARSIFIERS]
    if len(sparse) > 1:
        i, j = sparse[:2]
        return (f"{where}[{j}]: '{names[j]}' after '{names[i]}' ({where}[{i}]): the first sparsifier sends each tensor "
                "in a sparse form the second cannot read; keep one sparsifier")
    for i, name in enumerate(names):
        later = [(j, n) for j, n in enumerate(names) if j > i]
        if name == "checksum" and later:
            j, other = later[0]
            return f"{where}[{j}]: '{other}' cannot follow 'checksum' ({where}[{i}]): checksum must be the last stage"
        if name == "compact":
            for j, other in later:
                if other != "checksum":
                    return (
                        f"{where}[{j}]: '{other}' cannot follow 'compact' ({where}[{i}]): compact renames the "
                        "entries to positions in one flat tensor per dtype, so only 'checksum' may come after it"
                    )
    return None


@dataclass
class Encoded:
    data: bytes
    stage_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return len(self.data)


class CodecChain:
    def __init__(self, stages: list[Stage]):
        self.stages = stages
        self.totals: dict[str, int] = {}
        self.count = 0

    @classmethod
    def from_specs(cls, specs: list[dict], where: str) -> "CodecChain":
        stages = [build_stage(s, f"{where}[{i}]") for i, s in enumerate(specs)]
        problem = order_problem([s.name for s in stages], where)
        if problem is not None:
            raise RegistryError(problem)
        return cls(stages)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def stage_keys(self) -> list[str]:
        """``input`` then one key per stage; a repeated stage name gets ``#2``, ``#3``."""
        keys, seen = ["input"], {}
        for name in self.names:
            seen[name] = seen.get(name, 0) + 1
            keys.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
        return keys

    def encode(self, state: State, meta: dict[str, str], ctx: CodecContext) -> Encoded:
        payload = Payload(dict(state), dict(meta))
        keys = self.stage_keys()
        data = to_bytes(payload)
        sizes = {keys[0]: len(data)}
        for key, stage in zip(keys[1:], self.stages):
            payload = stage.encode(payload, ctx)
            data = to_bytes(payload)
            sizes[key] = len(data)
        for k, v in sizes.items():
            self.totals[k] = self.totals.get(k, 0) + v
        self.count += 1
        return Encoded(data, sizes)

    def take_totals(self) -> dict[str, int]:
        """Per-stage byte sums since the last call (and how many payloads), then reset."""
        out = {**self.totals, "payloads": self.count} if self.count else {}
        self.totals, self.count = {}, 0
        return out

    def decode(self, data: bytes, ctx: CodecContext) -> tuple[State, dict[str, str]]:
        payload = from_bytes(data)  # raises CodecError only (codecs/serialize.py)
        for stage in reversed(self.stages):
            try:
                payload = stage.decode(payload, ctx)
            except CodecError as exc:
                raise CodecError(f"{ctx.direction} payload of client {ctx.cid}, stage '{stage.name}': {exc}") from None
            except (RuntimeError, ValueError, IndexError, KeyError, TypeError) as exc:
                raise CodecError(f"{ctx.direction} payload of client {ctx.cid}, stage '{stage.name}' failed: {exc}") from None
        ref = ctx.reference
        if set(payload.tensors) != set(ref):
            missing = sorted(set(ref) - set(payload.tensors))[:3]
            extra = sorted(set(payload.tensors) - set(ref))[:3]
            raise CodecError(f"decoded payload names do not match the State: missing {missing}, unexpected {extra}")
        for k, t in payload.tensors.items():
            if tuple(t.shape) != tuple(ref[k].shape):
                raise CodecError(f"decoded tensor '{k}' has shape {tuple(t.shape)}, expected {tuple(ref[k].shape)}")
        state = {k: _as_reference(payload.tensors[k], ref[k]) for k in ref}
        return state, payload.meta


def _as_reference(t, ref):
    """Float to the reference's float dtype; any other tensor as it arrived (module docstring)."""
    return t.to(ref.dtype) if t.is_floating_point() and ref.is_floating_point() else t
