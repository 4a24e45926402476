"""What one server step of a round tells a later step of the same round.

``dp_clip`` (stage ``updates``) knows the clip norm it used and how many updates it kept;
``dp_noise`` (stage ``delta``) needs both to scale its noise, but a step receives only the
value of its stage and its own state: the notes ride on ``RoundContext.notes`` (one fresh
context per aggregation, so notes never leak into another round).
"""

from __future__ import annotations

from typing import Any


def put(ctx, **values: Any) -> None:
    ctx.notes.update(values)


def get(ctx, key: str, who: str) -> Any:
    if key not in ctx.notes:
        raise RuntimeError(f"{who}: no '{key}' noted this round; put a dp_clip step before it in server_steps")
    return ctx.notes[key]
