"""What a thief does to a leaked model to wash out a watermark, for evaluation only.

Two families, as in WAFFLE's robustness evaluation (Tekgul et al. 2021, "WAFFLE:
Watermarking in Federated Learning", Section 6: fine-tuning and pruning attacks):

- ``fine_tune``: train the leaked State on clean data of the thief's own for a number of
  epochs, with fedfm's client training loop (``learners/loop.py``);
- ``codec_roundtrip``: push the State through fedfm's own codec stages and back
  (``codecs.CodecChain.from_specs``: ``[{quantize: 8}]``, ``[{quantize: 4}]``,
  ``[{topk: 0.5}]`` = magnitude pruning keeping half of each tensor's entries).

Both return a new full State; the caller measures the watermark that survives.
"""

from __future__ import annotations

from fedfm.codecs import CodecChain, CodecContext
from fedfm.config import TrainConfig
from fedfm.core.types import State
from fedfm.ip.unique import Base
from fedfm.learners.base import LocalContext
from fedfm.learners.loop import train_loop
from fedfm.peft import get_state, set_state


def codec_roundtrip(state: State, specs: list[dict], seed: int = 0) -> tuple[State, int]:
    """(``state`` encoded and decoded by the codec chain ``specs``, its size in bytes)."""
    chain = CodecChain.from_specs(specs, "thief")
    ctx = CodecContext(direction="up", round=0, cid=0, reference=state, seed=seed)
    encoded = chain.encode(state, {}, ctx)
    decoded, _ = chain.decode(encoded.data, ctx)
    return decoded, encoded.nbytes


def fine_tune(base: Base, full_state: State, examples: list[dict], train: TrainConfig, seed: int = 0) -> tuple[State, dict]:
    """(``full_state`` fine-tuned on ``examples`` as ``train`` says, the train metrics)."""
    if not examples:
        raise ValueError("the thief's fine-tuning needs at least one clean example")
    set_state(base.model, full_state)
    ctx = LocalContext(cid=-1, model=base.model, task=base.task, tokenizer=base.tokenizer,
                       examples=examples, train=train, seed=seed)
    metrics = train_loop(ctx)
    return get_state(base.model), metrics
