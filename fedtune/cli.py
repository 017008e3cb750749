"""The ``fedtune`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedtune.deploy import cli as deploy_cli
from fedtune.errors import FedtuneError

# The documented default job (README, `make demo`). It lives in the repository, next to the package,
# not inside it: one file for the docs, the demo and this default. A non-editable install has no
# repository, and then a command without --config stops and says so rather than run something else.
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "simulations" / "configs" / "default.toml"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        help="TOML config file (default: simulations/configs/default.toml, the documented default job)",
    )
    p.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set train.lr=2e-3 (repeatable)",
    )
    add_unset_arg(p)


def add_unset_arg(p: argparse.ArgumentParser) -> None:
    """``--unset SECTION.KEY``: the key the config file sets goes back to its default (an override ``~KEY``)."""
    p.add_argument(
        "--unset",
        dest="overrides",
        action="append",
        type=lambda key: f"~{key}",
        metavar="SECTION.KEY",
        help="drop a setting the config file makes, back to its default, e.g. --unset aggregation.server_lr "
        "(repeatable; with --set, the later one wins)",
    )


def _load_config(args, extra: dict | None = None):
    from fedtune import config

    path = args.config
    if path is None:
        if not DEFAULT_CONFIG.is_file():
            raise FedtuneError(
                f"no --config given, and the default job {DEFAULT_CONFIG} is not there (fedtune installed without "
                "its repository?); pass --config FILE"
            )
        path = DEFAULT_CONFIG
    return config.load(path, {**config.parse_overrides(args.overrides), **(extra or {})})


def cmd_simulate(args) -> int:
    from fedtune.flower.apps import default_out_dir
    from fedtune.flower.simulation import simulate

    cfg = _load_config(args, {"simulation.ray_address": args.ray_address} if args.ray_address else None)
    out = Path(args.out) if args.out else default_out_dir(cfg)
    print(
        f"fedtune: simulating {cfg.federation.num_clients} clients, {cfg.federation.rounds} rounds -> {out}", flush=True
    )
    if args.resume and not args.out:
        raise FedtuneError("--resume needs --out RUN_DIR (the run to continue)")
    simulate(cfg, out, verbose=args.verbose, progress=lambda s: print(s, flush=True), resume=args.resume)
    return 0


def cmd_check_config(args) -> int:
    from fedtune import config

    cfg = _load_config(args)
    if not args.config_only:  # what a run refuses once it reads the model's name and the data
        from fedtune.workspace import check_data

        check_data(cfg)
    print(config.to_toml(cfg))
    return 0


def cmd_centralized(args) -> int:
    from fedtune.centralized import run_centralized

    cfg = _load_config(args)
    out = Path(args.out) if args.out else Path("runs") / f"{cfg.output.name}-centralized"
    run_centralized(cfg, out, progress=lambda s: print(s, flush=True))
    return 0


def cmd_zero_shot(args) -> int:
    from fedtune.zeroshot import run_zero_shot

    cfg = _load_config(args)
    out = Path(args.out) if args.out else Path("runs") / f"{cfg.output.name}-zero-shot"
    run_zero_shot(cfg, out, progress=lambda s: print(s, flush=True))
    return 0


def cmd_report(args) -> int:
    from fedtune.report import report

    text, written = report(args.run_dirs, out=args.out, metric=args.metric, plots=not args.no_plots)
    print(text)
    for path in written:
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated fine-tuning of language models with Flower")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("simulate", help="run a federated fine-tuning simulation on this machine")
    _add_config_args(p)
    p.add_argument("--out", "-o", help="run directory (default: runs/NAME-TIMESTAMP)")
    p.add_argument("--verbose", "-v", action="store_true", help="show Flower's and Ray's logs")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last complete round")
    p.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="run the clients on an existing Ray cluster (its head's address, or auto); "
        "same as --set simulation.ray_address=...",
    )
    p.set_defaults(func=cmd_simulate)
    p = sub.add_parser(
        "check-config",
        help="validate a config and print it resolved; refuses everything a run would refuse before training",
    )
    _add_config_args(p)
    p.add_argument(
        "--config-only",
        action="store_true",
        help="skip the checks that read the data and resolve the model (for a config of another machine)",
    )
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser(
        "centralized",
        help="train the centralized baseline of a config (pooled data, the federated run's total local steps)",
    )
    _add_config_args(p)
    p.add_argument("--out", "-o", help="run directory (default: runs/NAME-centralized)")
    p.set_defaults(func=cmd_centralized)
    p = sub.add_parser(
        "zero-shot", help="evaluate the model as shipped (no training) the way a run of the config is scored"
    )
    _add_config_args(p)
    p.add_argument("--out", "-o", help="run directory (default: runs/NAME-zero-shot)")
    p.set_defaults(func=cmd_zero_shot)
    p = sub.add_parser("report", help="summary table and PNG plots of one or more run directories")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories; ratios are given to the first")
    p.add_argument("--out", "-o", help="write the plots (all runs overlaid) here instead of into each run directory")
    p.add_argument("--metric", "-m", help="held-out metric to report (default: accuracy, or perplexity for causal LMs)")
    p.add_argument("--no-plots", action="store_true", help="print the table only")
    p.set_defaults(func=cmd_report)
    deploy_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fedtune.env import setup_environment

    setup_environment()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FedtuneError as exc:
        print(f"fedtune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
