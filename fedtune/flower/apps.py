"""Factories for the Flower ServerApp and ClientApp.

With a config given (``fedtune simulate``), the apps close over it. Without one
(``flwr run .``, deployment), they parse Flower's ``run_config`` once at start,
with the key ``config`` naming a TOML file relative to the app directory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedtune import config
from fedtune.config import FedtuneConfig

APP_DIR = Path(__file__).resolve().parents[2]


def _config_from_context(context: Context) -> FedtuneConfig:
    return config.from_run_config(context.run_config, base_dir=APP_DIR)


def resume_flag(context: Context) -> bool:
    """``flwr run . --run-config 'resume=true'``: continue from the run directory's last checkpoint."""
    value = context.run_config.get("resume", False)
    if isinstance(value, str):
        if value.lower() not in ("true", "false"):
            raise config.ConfigError(f"resume: must be true or false, got {value!r}")
        return value.lower() == "true"
    return bool(value)


def default_out_dir(cfg: FedtuneConfig) -> Path:
    if cfg.output.dir:
        return Path(cfg.output.dir)
    return Path("runs") / f"{cfg.output.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def make_server_app(
    cfg: FedtuneConfig | None = None,
    out_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    result: dict | None = None,
    resume: bool = False,
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedtune.flower.server import ServerLoop

        run_cfg = cfg or _config_from_context(context)
        resuming = resume or resume_flag(context)
        if resuming and out_dir is None and not run_cfg.output.dir:
            raise config.ConfigError(
                "resume: set output.dir (the run directory holding the checkpoint) to resume a run started with flwr run"
            )
        run_dir = out_dir or default_out_dir(run_cfg)
        if run_cfg.aggregation.secure != "none":  # SecAgg+ runs on Flower's legacy workflow path
            from fedtune.flower.secagg import run_secagg

            if resuming:
                raise config.ConfigError("resume: not supported with aggregation.secure = 'secagg+'")
            summary = run_secagg(grid, context, run_cfg, run_dir, progress or print)
        else:
            summary = ServerLoop(run_cfg, run_dir, progress=progress or print, resume=resuming).main(grid)
        if result is not None:
            result.update(summary)

    return app


def make_client_app(cfg: FedtuneConfig | None = None, mods: list | None = None) -> ClientApp:
    """fedtune's ClientApp; ``mods``: Flower client mods ``(msg, context, call_next) -> Message`` around it."""
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        run_cfg = cfg or _config_from_context(context)
        if run_cfg.aggregation.secure != "none":
            from fedtune.flower.secagg import handle_secagg_train

            return handle_secagg_train(msg, context, run_cfg)
        from fedtune.flower.client import handle_train

        return handle_train(msg, context, run_cfg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        from fedtune.flower.client import class_counts
        from fedtune.flower.identity import identity_reply

        run_cfg = cfg or _config_from_context(context)
        # the server orders nodes by it to sample (and, label-balanced, mixes classes by the counts)
        return identity_reply(msg, context.node_config, lambda: class_counts(context, run_cfg))

    return app
