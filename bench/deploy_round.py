"""Warm round time of the tiny model: deployment on loopback vs simulation, side by side.

One invocation runs, in turn (alternating when ``--repeats`` > 1):

* **simulation**: ``fedtune simulate`` in a subprocess, as the CLI runs it (Ray,
  one client actor per core);
* **deployment**: what ``docs/run-across-organizations.md`` sets up, on this
  machine: ``fedtune deploy certs / keys / superlink / register / supernode``
  (TLS, SuperNode authentication, ``--isolation process`` with fedtune's
  long-lived ClientApp worker), one SuperNode per silo, then the ``flwr run``
  line ``fedtune deploy run-line`` prints;
* with ``--database``, also **deployment, SuperLink state in SQLite**: the same,
  with ``fedtune deploy superlink --database`` (as the guide starts it; the other
  deployment modes keep the SuperLink's state in memory);
* with ``--flower-polling``, also **deployment, Flower's polling**: the same, but
  the SuperNodes started with ``fedtune deploy supernode --flower-polling``
  (Flower's unmodified SuperNode loop: 3 s between pulls when idle, 0.5 s
  between checks for a reply), to show what fedtune's polling removes.

All run the same config: ``--config`` (default ``simulations/configs/tiny.toml``)
with ``federation.num_clients`` = ``--silos``, every client sampled in every
round, ``federation.rounds`` = ``--rounds``, plus any ``--set key=value``. Round time is ``seconds`` in
``metrics.jsonl`` (the ServerApp's time from sampling to the aggregated
global: send, client work, replies, checks, aggregation; held-out evaluation and
the checkpoint are outside it). Round 1 loads the model everywhere and is not
counted; the figure is the median of rounds 2..R over all repeats.

    .venv/bin/python bench/deploy_round.py --rounds 8 --flower-polling
    .venv/bin/python bench/deploy_round.py --silos 20 --rounds 4           # many SuperNodes
    .venv/bin/python bench/deploy_round.py --no-simulation --silos 2 --rounds 3 \
        --config simulations/configs/smollm2-chatterbot.toml --set adapter.r=64 ...  # a large adapter

Besides round times, each run reports the bytes each way per client-round (from
``metrics.jsonl``) and, for deployments, the peak resident memory (``VmHWM``
summed over each process group, read just before it is stopped) of the SuperLink
(with its ServerApp) and of each SuperNode (with its ClientApp worker).

Raw outputs (every round, the processes' logs) in ``--out``
(default ``bench/results/deploy_round/``); the table is printed and written to
``table.md`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FEDTUNE = [sys.executable, "-m", "fedtune"]
TINY = "simulations/configs/tiny.toml"

sys.path.insert(0, str(ROOT))
from fedtune.deploy.cli import connection_toml  # noqa: E402


def free_port(lo: int, hi: int) -> int:
    for _ in range(200):
        port = random.randint(lo, hi)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}-{hi}")


CONFIG = TINY
EXTRA: list[str] = []  # --set overrides, for every mode


def overrides(silos: int, rounds: int, out: Path) -> list[str]:
    return [
        f"federation.num_clients={silos}",
        f"federation.min_train_clients={silos}",
        "federation.fraction_train=1.0",
        f"federation.rounds={rounds}",
        f"output.dir={out}",
        *EXTRA,
    ]


def round_figures(out: Path) -> dict:
    """Seconds of rounds 1..R and the mean bytes up / down per client-round."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["accepted"] == r["sampled"] for r in rows[1:]), f"a round lost an update: {out}"
    trained = [r for r in rows if r["round"] >= 1]
    ups = [b for r in trained for b in r.get("bytes_up_per_client", {}).values()]
    downs = [b for r in trained for b in r.get("bytes_down_per_client", {}).values()]
    return {
        "seconds": [r["seconds"] for r in trained],
        "bytes_up": statistics.mean(ups) if ups else None,
        "bytes_down": statistics.mean(downs) if downs else None,
    }


def group_peak_mb(pgid: int) -> float:
    """Peak resident memory (VmHWM) summed over the live processes of process group ``pgid``, in MB."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # fields after the command: state, ppid, pgrp, ...
                continue
            for line in (stat.parent / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
    return total / 1024


def env() -> dict[str, str]:
    return {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def run_simulation(work: Path, silos: int, rounds: int) -> dict:
    out = work / "out"
    argv = [*FEDTUNE, "simulate", "-c", str(ROOT / CONFIG), "--out", str(out)]
    for item in overrides(silos, rounds, out):
        argv += ["-s", item]
    t0 = time.monotonic()
    with (work / "simulate.log").open("w") as log:
        subprocess.run(argv, check=True, env=env(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return {**round_figures(out), "wall": time.monotonic() - t0}


class Deployment:
    """A SuperLink and ``silos`` SuperNodes started with ``fedtune deploy``, each in its own process group."""

    def __init__(self, work: Path, silos: int, flower_polling: bool, database: bool = False):
        self.work, self.silos, self.flower_polling, self.database = work, silos, flower_polling, database
        self.env = env()
        self.procs: list[subprocess.Popen] = []
        self.names: list[str] = []
        self.port = free_port(19000, 19899)
        self.cli_home = work / "home-cli"

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        home = self.work / f"home-{name}"
        home.mkdir(exist_ok=True)
        with (self.work / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**self.env, "FLWR_HOME": str(home)},
            )
        self.procs.append(proc)
        self.names.append(name)
        return proc

    def peak_mb(self) -> dict[str, float]:
        """Peak resident memory of each started process group (SuperLink, silo-1, ...), in MB."""
        return {name: round(group_peak_mb(p.pid), 1) for name, p in zip(self.names, self.procs)}

    def wait_for(self, what: str, predicate, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}; logs in {self.work}")
            time.sleep(0.5)

    def log(self, name: str) -> str:
        path = self.work / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def cli(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            argv,
            env={**self.env, "FLWR_HOME": str(self.cli_home)},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def setup(self) -> None:
        pki, keys = self.work / "pki", self.work / "keys"
        names = [f"silo-{i}" for i in range(1, self.silos + 1)]
        subprocess.run(
            [*FEDTUNE, "deploy", "certs", "--out", str(pki), "--host", "127.0.0.1", "--port", str(self.port)],
            check=True,
            env=self.env,
            capture_output=True,
        )
        subprocess.run(
            [*FEDTUNE, "deploy", "keys", "--out", str(keys), *[a for n in names for a in ("--name", n)]],
            check=True,
            env=self.env,
            capture_output=True,
        )
        self.cli_home.mkdir()
        (self.cli_home / "config.toml").write_text(connection_toml("bench", f"127.0.0.1:{self.port}", pki / "ca.crt"))
        self.start(
            "superlink",
            [
                *FEDTUNE,
                "deploy",
                "superlink",
                "--certs",
                str(pki),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *(["--database", str(self.work / "superlink.db")] if self.database else []),
            ],
        )
        self.wait_for("the SuperLink", lambda: "Uvicorn running on https" in self.log("superlink"))
        for n in names:
            res = self.cli(*FEDTUNE, "deploy", "register", str(keys / f"{n}.pub"), "--connection", "bench")
            assert res.returncode == 0, res.stdout + res.stderr
        for i, n in enumerate(names):
            self.start(
                n,
                [
                    *FEDTUNE,
                    "deploy",
                    "supernode",
                    "--superlink",
                    f"127.0.0.1:{self.port}",
                    "--certs",
                    str(pki),
                    "--key",
                    str(keys / n),
                    "--partition-id",
                    str(i),
                    "--num-partitions",
                    str(self.silos),
                    "--port",
                    str(free_port(29000, 29899)),
                    *(["--flower-polling"] if self.flower_polling else []),
                ],
            )
        flwr = str(BIN / "flwr")
        self.wait_for(
            "every silo online",
            lambda: (
                self.cli(flwr, "supernode", "list", "bench", "--format", "json").stdout.count('"online"') == self.silos
            ),
        )

    def run(self, app: Path, rounds: int) -> dict:
        out = self.work / "out"
        line = subprocess.run(
            [
                *FEDTUNE,
                "deploy",
                "run-line",
                "--connection",
                "bench",
                "--app",
                str(app),
                "--config",
                CONFIG,
                *[a for o in overrides(self.silos, rounds, out) for a in ("-s", o)],
            ],
            check=True,
            env=self.env,
            capture_output=True,
            text=True,
        ).stdout.strip()
        argv = shlex.split(line)
        argv[0] = str(BIN / "flwr")
        t0 = time.monotonic()
        with (self.work / "run.log").open("w") as log:
            subprocess.run(
                argv,
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=1800,
                env={**self.env, "FLWR_HOME": str(self.cli_home)},
                cwd=app,
            )
        wall = time.monotonic() - t0
        for _ in range(60):  # `flwr run --stream` may return before the summary is written
            if (out / "summary.json").exists():
                break
            time.sleep(0.5)
        return {**round_figures(out), "wall": wall, "peak_mb": self.peak_mb()}

    def stop(self) -> None:
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)  # the group this script created for it
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def copy_app(dst: Path) -> Path:
    dst.mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", dst)
    for d in ("fedtune", "server", "clients", "simulations"):
        shutil.copytree(ROOT / d, dst / d, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dst


def run_deployment(work: Path, silos: int, rounds: int, flower_polling: bool, database: bool) -> dict:
    app = copy_app(work / "app")
    dep = Deployment(work, silos, flower_polling, database)
    try:
        t0 = time.monotonic()
        dep.setup()
        setup = time.monotonic() - t0
        result = dep.run(app, rounds)
        result["setup"] = setup
        return result
    finally:
        dep.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=8, help="rounds per run; round 1 is not counted (default 8)")
    p.add_argument("--silos", type=int, default=3, help="SuperNodes = clients, all sampled each round (default 3)")
    p.add_argument("--repeats", type=int, default=1, help="alternate the modes this many times (default 1)")
    p.add_argument(
        "--flower-polling", action="store_true", help="also run the deployment with Flower's SuperNode polling"
    )
    p.add_argument(
        "--database",
        action="store_true",
        help="also run the deployment with the SuperLink's state in SQLite (--database), as the guide does",
    )
    p.add_argument("--config", default=TINY, help=f"the run's config (default {TINY})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an extra override, repeatable")
    p.add_argument("--no-simulation", action="store_true", help="run only the deployment mode(s)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "deploy_round"))
    args = p.parse_args(argv)
    global CONFIG
    CONFIG = args.config
    EXTRA[:] = args.set
    if args.rounds < 3:
        p.error("--rounds: at least 3 (round 1 is not counted)")
    out = Path(args.out).resolve()  # `flwr run` runs in the app directory
    out.mkdir(parents=True, exist_ok=True)
    modes = (
        ([] if args.no_simulation else ["simulation"])
        + ["deployment"]
        + (["deployment-database"] if args.database else [])
        + (["deployment-flower-polling"] if args.flower_polling else [])
    )
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    load = [os.getloadavg()[0]]
    for rep in range(args.repeats):
        for mode in modes:
            work = Path(tempfile.mkdtemp(prefix=f"{mode}-{rep}-", dir=out))
            print(f"[{rep + 1}/{args.repeats}] {mode} ({work})", flush=True)
            if mode == "simulation":
                res = run_simulation(work, args.silos, args.rounds)
            else:
                res = run_deployment(
                    work, args.silos, args.rounds, mode == "deployment-flower-polling", mode == "deployment-database"
                )
            res["load"] = os.getloadavg()[0]
            load.append(res["load"])
            runs[mode].append(res)
            print(f"    rounds (s): {[round(s, 3) for s in res['seconds']]}", flush=True)

    def warm(mode: str) -> list[float]:
        return [s for r in runs[mode] for s in r["seconds"][1:]]

    def mean_of(mode: str, key: str) -> str:
        vals = [r[key] for r in runs[mode] if r.get(key) is not None]
        return f"{statistics.mean(vals):,.0f}" if vals else ""

    def peak(mode: str, which: str) -> str:
        vals = [
            mb
            for r in runs[mode]
            for name, mb in r.get("peak_mb", {}).items()
            if (name == "superlink") == (which == "superlink")
        ]
        return f"{max(vals):,.0f}" if vals else ""

    sim = statistics.median(warm("simulation")) if "simulation" in runs else None
    lines = [
        f"{args.config} {' '.join(args.set)}: {args.silos} clients, all sampled, {args.rounds} rounds x "
        f"{args.repeats} repeat(s); warm rounds = rounds 2..{args.rounds}; load average {min(load):.1f}-{max(load):.1f}",
        "",
        "| mode | warm rounds | median (s) | min (s) | max (s) | median - simulation (s) | / simulation "
        "| B up / client-round | B down / client-round | SuperLink peak MB | SuperNode peak MB (max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in modes:
        w = warm(mode)
        med = statistics.median(w)
        vs = (f"{med - sim:+.3f}", f"{med / sim:.2f}x") if sim else ("", "")
        lines.append(
            f"| {mode} | {len(w)} | {med:.3f} | {min(w):.3f} | {max(w):.3f} | {vs[0]} | {vs[1]} "
            f"| {mean_of(mode, 'bytes_up')} | {mean_of(mode, 'bytes_down')} | {peak(mode, 'superlink')} "
            f"| {peak(mode, 'supernode')} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    (out / "table.md").write_text(table + "\n")
    (out / "runs.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
