"""The fedfm ServerApp: ``FlowerServer`` behind Flower's ``@app.main()``.

Run config keys (``[tool.flwr.app.config]`` of the shipped app, overridden per run by
``fedfm flower submit`` or ``flwr run --run-config``):

- ``experiment``: the experiment as JSON text (``payload.experiment_text``);
- ``out``: the run directory on the machine that runs the ServerApp (default
  ``runs/<name>`` relative to that process's working directory).

``app`` reads them from Flower's Context (``flwr run``); ``make_server_app(defaults)``
builds an app with a fixed run config (``fedfm run`` with the simulation runtime),
and puts the run summary in ``result`` for the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedfm.runtime.flower.payload import experiment_from_text


def make_server_app(defaults: dict[str, Any] | None = None, result: dict[str, Any] | None = None) -> ServerApp:
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        from fedfm.runtime.flower.server import FlowerServer

        settings = {**dict(context.run_config), **(defaults or {})}
        exp = experiment_from_text(str(settings.get("experiment", "")))
        if exp.runtime.threads:
            import torch

            torch.set_num_threads(exp.runtime.threads)
        out = str(settings.get("out") or "") or str(Path("runs") / exp.name)
        runner = FlowerServer(exp, out, grid)
        summary = runner.run()
        if result is not None:
            result["summary"] = summary
            result["state"] = runner.final_state

    return server


app = make_server_app()
