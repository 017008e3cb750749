"""Scaling: 10, 100 and 1000 virtual clients on the tiny model, 10 sampled per round.

Each run is ``fedtune simulate`` in a subprocess (Flower simulation engine, Ray),
with the same per-round work whatever the number of clients: 10 clients sampled,
``train.local_steps`` steps of ``train.batch_size`` each. The data is the whole
Rotten Tomatoes training split (6,824 examples) cut IID, so even with 1000
clients every client holds at least 6 examples, more than one batch of 4.

Round time: ``seconds`` in ``metrics.jsonl`` (sampling to aggregated global;
held-out evaluation is outside it: ``federation.eval_every`` exceeds the run),
median of rounds 2..R-1 (round 1 loads the model in the actors, round R
evaluates on the full held-out split). Peak memory: the largest sum of RSS over
the ``fedtune simulate`` process and all its descendants (Ray's GCS, raylet,
agents and worker actors), sampled every 0.2 s by a background thread; RSS
counts shared pages once per process, so the sum overstates the true footprint.

    .venv/bin/python bench/scaling.py --clients 10 100 1000 --repeats 2 --out bench/results/scaling
    .venv/bin/python bench/scaling.py --profile-dispatch 1000 [--flower-dispatch]   # the dispatch sweep, timed
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
CONFIG = "simulations/configs/tiny.toml"
OVERRIDES = [
    'data.partition="iid"',
    "data.max_train_examples=0",
    "train.batch_size=4",
    "federation.fraction_train=0.01",
    "federation.min_train_clients=10",
    "federation.rounds=10",
    "federation.eval_every=1000",
    "output.save_adapter=false",
]


class TreeMemory:
    """Background sampler of the summed RSS of a process and its descendants."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.peak_by_name: dict[str, int] = {}
        self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total, by_name = 0, {}
        for p in procs:
            try:
                rss = p.memory_info().rss
                name = p.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += rss
            by_name[name] = by_name.get(name, 0) + rss
        if total > self.peak:
            self.peak, self.peak_by_name, self.peak_procs = total, by_name, len(procs)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


def run(num_clients: int, run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "fedtune", "simulate", "--config", str(REPO / CONFIG), "--out", str(run_dir)]
    for o in [*OVERRIDES, f"federation.num_clients={num_clients}"]:
        cmd += ["--set", o]
    env = dict(os.environ)
    env["PATH"] = f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO, start_new_session=True
    )
    line_times: dict[int, float] = {}
    log: list[str] = []
    try:
        with TreeMemory(proc.pid) as mem:
            for line in proc.stdout:
                log.append(line)
                m = re.match(r"round (\d+)[:/]", line)
                if m:
                    line_times[int(m.group(1))] = time.monotonic() - t0
            rc = proc.wait(timeout=1800)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)  # its session holds Ray's processes too
            proc.wait()
    if rc != 0:
        raise RuntimeError(f"fedtune simulate failed ({rc}):\n{''.join(log[-30:])}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r["round"] >= 1]
    seconds = [r["seconds"] for r in rounds]
    return {
        "num_clients": num_clients,
        "sampled": [r["sampled"] for r in rounds],
        "seconds": seconds,
        "steady_round_s": statistics.median(seconds[1:-1]),
        "start_to_round0_s": line_times.get(0),
        "round1_s": seconds[0],
        "wall_s": time.monotonic() - t0,
        "peak_rss_bytes": mem.peak,
        "peak_processes": mem.peak_procs,
        "peak_rss_by_name": dict(sorted(mem.peak_by_name.items(), key=lambda kv: -kv[1])),
    }


def profile_dispatch(num_clients: int, rounds: int = 6, *, flower: bool = False) -> dict:
    """Time the simulation engine's dispatch sweep in an in-process run.

    Flower's ``vce_api.add_messages_to_queue`` thread asks the in-memory
    LinkState, every 0.1 s, for one message per registered node, and each ask
    scans every stored message: O(nodes x messages) Python work under the GIL of
    the process that also runs the ServerApp. fedtune's replacement
    (`fedtune.flower.simulation.add_messages_to_queue`, the default) finds the
    nodes with a message in one scan and asks only those. ``flower``: time
    Flower's loop instead. Each sweep is the loop body, timed.
    """
    import statistics as st

    from fedtune import config
    from fedtune.env import setup_environment
    from fedtune.flower.simulation import DISPATCH_INTERVAL_S, dispatch_sweep, simulate

    sweeps: list[tuple[float, float]] = []

    def timed_sweep(state, queue, nodes_mapping, f_stop):
        order = list(nodes_mapping.keys())
        rank = {n: i for i, n in enumerate(order)}
        while not f_stop.is_set():
            t0, c0 = time.perf_counter(), time.thread_time()
            if flower:
                for node_id in order:
                    for msg in state.get_message_ins(node_id=node_id, limit=1):
                        queue.put(msg)
            else:
                dispatch_sweep(state, queue, rank)
            sweeps.append((time.perf_counter() - t0, time.thread_time() - c0))
            f_stop.wait(0.1 if flower else DISPATCH_INTERVAL_S)

    setup_environment()
    os.environ["PATH"] = f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    overrides = [*OVERRIDES, f"federation.num_clients={num_clients}", f"federation.rounds={rounds}"]
    cfg = config.load(REPO / CONFIG, config.parse_overrides(overrides))
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        simulate(cfg, Path(tmp) / "run", progress=lambda s: None, dispatch=timed_sweep)
    wall = sorted(w for w, _ in sweeps)
    return {
        "num_clients": num_clients,
        "loop": "flower" if flower else "fedtune",
        "sweeps": len(sweeps),
        "run_s": time.monotonic() - t0,
        "sweep_ms_median": 1000 * st.median(wall),
        "sweep_ms_p90": 1000 * wall[int(0.9 * len(wall))],
        "sweep_ms_max": 1000 * wall[-1],
        "sweep_thread_cpu_s": sum(c for _, c in sweeps),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--repeats", type=int, default=1, help="passes over --clients, interleaved")
    ap.add_argument("--out", default="bench/results/scaling")
    ap.add_argument(
        "--profile-dispatch",
        type=int,
        metavar="N",
        help="instead: time the dispatch sweep in one in-process run with N clients",
    )
    ap.add_argument(
        "--flower-dispatch",
        action="store_true",
        help="run Flower's own dispatch loop instead of fedtune's (both modes)",
    )
    args = ap.parse_args()
    if args.profile_dispatch:
        print(json.dumps(profile_dispatch(args.profile_dispatch, flower=args.flower_dispatch)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    for rep in range(args.repeats):
        for n in args.clients:
            with tempfile.TemporaryDirectory(prefix=f"scaling-{n}-") as tmp:
                r = run(n, Path(tmp) / "run")
            r["repeat"] = rep + 1
            runs.append(r)
            print(
                f"[{n} clients, repeat {rep + 1}] rounds {[round(s, 3) for s in r['seconds']]} "
                f"steady {r['steady_round_s']:.3f}s peak {r['peak_rss_bytes'] / 2**30:.2f} GiB "
                f"({r['peak_processes']} processes), wall {r['wall_s']:.0f}s",
                flush=True,
            )
    summary = []
    for n in args.clients:
        mine = [r for r in runs if r["num_clients"] == n]
        steady = [s for r in mine for s in r["seconds"][1:-1]]
        summary.append(
            {
                "num_clients": n,
                "round_s_median": statistics.median(steady),
                "peak_rss_gib": max(r["peak_rss_bytes"] for r in mine) / 2**30,
                "start_to_round0_s": statistics.median(r["start_to_round0_s"] for r in mine),
                "round1_s": statistics.median(r["round1_s"] for r in mine),
            }
        )
    base = summary[0]["round_s_median"]
    lines = [
        "| clients | sampled/round | round time, median rounds 2..R-1 (s) | vs 10 clients "
        "| peak RSS, process tree (GiB) | start to round 0 (s) | round 1 (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        s["vs_first"] = s["round_s_median"] / base
        lines.append(
            f"| {s['num_clients']} | 10 | {s['round_s_median']:.3f} | {s['vs_first']:.2f}x "
            f"| {s['peak_rss_gib']:.2f} | {s['start_to_round0_s']:.1f} | {s['round1_s']:.2f} |"
        )
    spread = max(s["round_s_median"] for s in summary) / min(s["round_s_median"] for s in summary)
    lines.append("")
    verdict = "met" if spread <= 1.2 else "not met"
    lines.append(
        f"slowest / fastest round time: {spread:.2f}x (target <= 1.20x: {verdict}); "
        f"peak memory {max(s['peak_rss_gib'] for s in summary):.2f} GiB (target < 6 GB: "
        f"{'met' if max(s['peak_rss_gib'] for s in summary) * 2**30 < 6e9 else 'not met'})"
    )
    text = "\n".join(lines)
    (out / "results.json").write_text(
        json.dumps(
            {"config": CONFIG, "overrides": OVERRIDES, "summary": summary, "spread": spread, "runs": runs}, indent=1
        )
    )
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
