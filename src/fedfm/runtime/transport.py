"""The in-process transport: every client is answered by ``client.handle`` in this process.

It is the local backend's transport: one base model in memory serves the server's
evaluation and every client's training. A client that raises is a failed reply carrying
the error, never a crashed round. Nothing else happens here: faults, retries, validation,
byte counting and checkpoints are the round loop's (``runtime/loop.py``), the same over
every transport.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from fedfm.core.protocols import Envelope, Reply
from fedfm.runtime.client import ClientEnv, handle

log = logging.getLogger("fedfm.runtime")


def answer(
    env: ClientEnv,
    e: Envelope,
    on_start: Callable[[int], None] | None = None,
    on_end: Callable[[], None] | None = None,
) -> Reply:
    """One message answered by ``client.handle`` in this process; a client that raises is a
    failed reply, never a crashed round."""
    if on_start is not None:
        on_start(e.cid)
    try:
        data, info = handle(env, e)
        return Reply(e.cid, data=data, info=info)
    except Exception as exc:  # a client's failure never stops the round
        return Reply(e.cid, error=f"{type(exc).__name__}: {exc}")
    finally:
        if on_end is not None:
            on_end()


class InProcessTransport:
    name = "local"

    def __init__(
        self,
        env: ClientEnv,
        on_start: Callable[[int], None] | None = None,
        on_end: Callable[[], None] | None = None,
    ):
        self.env = env
        self.on_start, self.on_end = on_start, on_end

    def exchange(self, envelopes: Sequence[Envelope], timeout: float | None = None) -> dict[int, Reply]:
        return {e.cid: answer(self.env, e, self.on_start, self.on_end) for e in envelopes}

    def close(self) -> None:
        pass
