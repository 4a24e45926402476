"""The round loop with the server's context in the exchange phases' ``round_state``.

An exchange phase's server side (``messages``/``receive``/``transform``) sees only
``round_state``; a phase that computes on the server (SplitFed's main server: forward and
backward of the server-side part at every step, ``learners/splitfed.py``) also needs the
server's base model and the round's server state. ``ServerContextLoop`` is
``runtime/loop.RoundLoop`` with exactly that added: ``round_state["workbench"]`` (the
server's ``Workbench``) and ``round_state["server_state"]`` (the ``ServerState`` the round
started from), set before each phase. The proposed change to ``RoundLoop._attempt`` is
the same two keys in the dict it builds; once it has them, this class is not needed.

``run_local(exp, out)`` is ``runtime/local.run_local`` on this loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedfm.runtime.loop import RoundLoop


class ServerContextLoop(RoundLoop):
    def _attempt(self, rnd, attempt, server_state, rlog):
        self._phase_context = {"workbench": self.wb, "server_state": server_state}
        return super()._attempt(rnd, attempt, server_state, rlog)

    def _phase(self, rnd, attempt, phase, participants, round_state, rlog, contacted):
        for key, value in self._phase_context.items():
            round_state.setdefault(key, value)
        return super()._phase(rnd, attempt, phase, participants, round_state, rlog, contacted)


def local_runtime(exp, out: str | Path, **kw):
    """A ``LocalRuntime`` whose round loop is a ``ServerContextLoop``."""
    from fedfm.runtime.local import LocalRuntime

    rt = LocalRuntime(exp, out, **kw)
    old = rt.loop
    rt.loop = ServerContextLoop(exp, out, rt.transport, rt.wb, resume=old.resume, overwrite=old.overwrite,
                                progress=rt.prog, backend="local")
    return rt


def run_local(exp, out: str | Path, **kw) -> dict[str, Any]:
    return local_runtime(exp, out, **kw).run()


__all__ = ["ServerContextLoop", "local_runtime", "run_local"]
