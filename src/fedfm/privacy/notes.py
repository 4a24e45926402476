"""What one server step of a round tells a later step of the same round.

``dp_clip`` (stage ``updates``) knows the clip norm it used and how many updates it kept;
``dp_noise`` (stage ``delta``) needs both to scale its noise, but a step receives only the
value of its stage and its own state. Until ``RoundContext`` has a field for this, the
notes ride on the round's context object itself (one fresh ``RoundContext`` per
aggregation, so notes never leak into another round).
"""

from __future__ import annotations

from typing import Any

ATTR = "privacy_notes"


def put(ctx, **values: Any) -> None:
    notes = getattr(ctx, ATTR, None)
    if notes is None:
        notes = {}
        setattr(ctx, ATTR, notes)
    notes.update(values)


def get(ctx, key: str, who: str) -> Any:
    notes = getattr(ctx, ATTR, None) or {}
    if key not in notes:
        raise RuntimeError(f"{who}: no '{key}' noted this round; put a dp_clip step before it in server_steps")
    return notes[key]
