"""The fedfm ServerApp: the one round loop (``runtime/loop.py``) over ``FlowerTransport``.

Run config keys (``[tool.flwr.app.config]`` of the shipped app, overridden per run by
``fedfm flower submit`` or ``flwr run --run-config``):

- ``experiment``: the experiment as JSON text (``payload.experiment_text``);
- ``out``: the run directory on the machine that runs the ServerApp (default
  ``runs/<name>`` relative to that process's working directory);
- ``resume`` / ``overwrite``: continue the run in ``out`` from its last checkpoint, or
  replace it (as ``fedfm run --resume`` / ``--overwrite``).

The server side keeps only what it needs: the base model (for evaluation and server
steps) and the test set. It reads the data source once to compute the seeded partition
(the test rows, client sizes and profiles), then drops the text of every client row;
clients' examples are never held or tokenized here (``Workbench(server_only=True)``).
The clients' nodes are found (``FlowerTransport.discover``) before the loop starts, so a
deployment short of nodes stops before round 0 with the missing client ids named.
``make_server_app(defaults)`` builds an app with a fixed run config (``fedfm run`` with
the simulation runtime) and puts the run summary in ``result`` for the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedfm.runtime.flower.payload import experiment_from_text


def truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def make_server_app(defaults: dict[str, Any] | None = None, result: dict[str, Any] | None = None, stop=None) -> ServerApp:
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        from fedfm.runtime.flower.transport import FlowerTransport
        from fedfm.runtime.loop import RoundLoop
        from fedfm.runtime.progress import RunProgress
        from fedfm.runtime.workbench import Workbench

        settings = {**dict(context.run_config), **(defaults or {})}
        exp = experiment_from_text(str(settings.get("experiment", "")))
        if exp.runtime.threads:
            import torch

            torch.set_num_threads(exp.runtime.threads)
        out = str(settings.get("out") or "") or str(Path("runs") / exp.name)
        mode = exp.runtime.flower.mode
        transport = FlowerTransport(grid, exp.federation.clients, exp.runtime.flower, mode, record=Path(out) / "nodes.jsonl",
                                    stop=stop)
        loop = RoundLoop(
            exp, out, transport, Workbench(exp, server_only=True),
            resume=truthy(settings.get("resume", False)),
            overwrite=truthy(settings.get("overwrite", False)),
            progress=RunProgress(exp.rounds, bool(settings.get("progress", False)) and exp.runtime.progress),
            backend=transport.name,
        )
        if transport.nodes is None:  # every client's node found before the first round: nothing written on a shortfall
            transport.nodes = transport.discover()
        summary = loop.run()
        if result is not None:
            result["summary"] = summary
            result["state"] = loop.final_state

    return server


app = make_server_app()
