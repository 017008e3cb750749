"""Framework overhead: a federated round on Flower's simulation engine vs a plain PyTorch loop.

For each preset the script runs, side by side in one invocation (alternating when
``--repeats`` > 1):

* **flower**: ``fedtune simulate`` in a subprocess, exactly as the CLI runs it
  (Ray, ``simulation.cpus`` = the machine's cores, one core and
  ``simulation.threads_per_client`` torch threads per client actor);
* **plain-procs**: the same local steps in plain PyTorch, no Flower and no Ray:
  as many worker processes as the simulation has concurrent actors, each with
  the same number of torch threads, pulling clients from one queue; the main
  process averages the deltas (FedAvg, weighted by examples);
* **plain-seq**: the same work in this one process, one client after another
  with one torch thread (the pure compute; /workers is the ideal parallel time).

"The same local steps on the same data": the same config, hence the same
partitions, tokenization, batch size, optimizer and ``train.local_steps``; the
clients trained in each round are those the simulation trained (read back from
its ``metrics.jsonl``, matched to partitions by their example count, which is
unique per partition in these presets), and the batches come from the same
per-(round, partition) generator seed as in ``fedtune.flower.client``.

Timed interval. flower: ``seconds`` of each round in ``metrics.jsonl``, the
ServerApp's time from sampling the nodes to the aggregated global (send, Ray
dispatch, client work, records, decoding, checks, strategy); held-out
evaluation is outside it because ``federation.eval_every`` is larger than the
run, and so is the per-round checkpoint write (also reported: the interval
between consecutive round lines on stdout, which includes it). plain: from
handing out the round's clients to the averaged global. Round 1 (model loading,
Ray start, first tokenization) and the last round (it evaluates on the full
held-out split) are not counted; the figure is the median of rounds 2..R-1.

    .venv/bin/python bench/overhead.py --preset tiny --preset minilm --out bench/results/overhead
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# eval_every beyond the run: only rounds 0 and R evaluate, both outside the median
COMMON = ["federation.eval_every=1000", "output.save_adapter=false"]
PRESETS: dict[str, tuple[str, list[str]]] = {
    # tiny random BERT: 4 clients, 2 per round, 10 local steps of batch 8
    "tiny": (
        "simulations/configs/tiny.toml",
        [
            "federation.num_clients=4",
            "federation.fraction_train=0.5",
            "federation.min_train_clients=2",
            "federation.rounds=12",
            "train.local_steps=10",
        ],
    ),
    # all-MiniLM-L6-v2 + LoRA, bf16 autocast: 10 clients, 2 per round, 10 local steps of batch 16
    "minilm": (
        "simulations/configs/default.toml",
        [
            "federation.num_clients=10",
            "federation.fraction_train=0.2",
            "federation.min_train_clients=2",
            "federation.rounds=5",
            "train.local_steps=10",
            'train.mixed_precision="bf16"',
            'train.lr_schedule="constant"',
            "federation.round_eval_examples=32",
            "data.max_test_examples=64",
        ],
    ),
}


def load_cfg(config_path: str, overrides: list[str]):
    from fedtune import config

    return config.load(REPO / config_path, config.parse_overrides(overrides))


# --- the plain loop -----------------------------------------------------------------------


class PlainClient:
    """One process's model and data; ``train`` is a client's round without Flower."""

    def __init__(self, config_path: str, overrides: list[str], threads: int):
        import torch

        from fedtune import workspace
        from fedtune.env import setup_environment

        setup_environment()
        torch.set_num_threads(threads)
        self.cfg = load_cfg(config_path, overrides)
        self.ws = workspace.get(self.cfg)
        self.keys = self.ws.trainable_keys()

    def train(self, rnd: int, pid: int, state):
        import torch

        from fedtune import adapters
        from fedtune.seeds import derive_seed
        from fedtune.train import round_lr, train_local

        ws, cfg = self.ws, self.cfg
        data = ws.client_data(pid)
        adapters.set_state_(ws.model, state)
        if cfg.train.lr_schedule != "constant":  # as the client does
            cfg = cfg.replace(**{"train.lr": round_lr(cfg.train, rnd, cfg.federation.rounds)})
        gen = torch.Generator().manual_seed(derive_seed(cfg.train.seed, rnd, pid))
        metrics = train_local(
            ws.model, data, cfg.train, task=ws.task, pad_id=ws.pad_id, device=ws.device, generator=gen
        )
        local = adapters.get_state(ws.model)
        return {k: local[k] - state[k] for k in self.keys}, len(data), metrics["train_loss"]


def _worker(config_path, overrides, threads, jobs, results):
    client = PlainClient(config_path, overrides, threads)
    results.put(("ready", os.getpid()))
    import torch

    while (job := jobs.get()) is not None:
        rnd, pid, arrays = job
        t0 = time.monotonic()
        delta, n, loss = client.train(rnd, pid, {k: torch.from_numpy(v) for k, v in arrays.items()})
        # numpy over the pipe: torch's own reducer would move each tensor through a shared-memory file
        results.put(({k: v.numpy() for k, v in delta.items()}, n, loss, time.monotonic() - t0))


def fedavg_(state, replies) -> None:
    total = sum(n for _, n, _ in replies)
    for k in replies[0][0]:
        state[k] = state[k] + sum(d[k] * (n / total) for d, n, _ in replies)


def run_plain(config_path: str, overrides: list[str], schedule: list[list[int]], workers: int, threads: int) -> dict:
    """Rounds of ``schedule`` (partition ids per round) on ``workers`` processes; seconds per round."""
    import torch

    from fedtune import workspace

    cfg = load_cfg(config_path, overrides)
    torch.set_num_threads(threads)
    state = workspace.get(cfg).initial_state()
    ctx = mp.get_context("spawn")
    jobs, results = ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(config_path, overrides, threads, jobs, results), daemon=True)
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            tag, _pid = results.get(timeout=600)
            assert tag == "ready"
        seconds, train_s = [], []
        for rnd, pids in enumerate(schedule, start=1):
            t0 = time.monotonic()
            arrays = {k: v.numpy() for k, v in state.items()}
            for pid in pids:
                jobs.put((rnd, pid, arrays))
            replies = [results.get(timeout=600) for _ in pids]
            fedavg_(state, [({k: torch.from_numpy(v) for k, v in d.items()}, n, loss) for d, n, loss, _ in replies])
            seconds.append(time.monotonic() - t0)
            train_s.append(max(r[3] for r in replies))
    finally:
        for _ in procs:
            jobs.put(None)
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return {"seconds": seconds, "slowest_client_train_s": train_s}


def run_sequential(config_path: str, overrides: list[str], schedule: list[list[int]], threads: int) -> dict:
    """The same rounds in this process, one client after another."""
    client = PlainClient(config_path, overrides, threads)
    state = client.ws.initial_state()
    seconds = []
    for rnd, pids in enumerate(schedule, start=1):
        t0 = time.monotonic()
        replies = [client.train(rnd, pid, state) for pid in pids]
        fedavg_(state, replies)
        seconds.append(time.monotonic() - t0)
    return {"seconds": seconds}


# --- the Flower simulation ----------------------------------------------------------------


def flower_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"  # Flower starts its executables by name
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    return env


def run_flower(config_path: str, overrides: list[str], run_dir: Path) -> dict:
    """``fedtune simulate`` in a subprocess; its per-round seconds, clients and stdout round-line times."""
    cmd = [sys.executable, "-m", "fedtune", "simulate", "--config", str(REPO / config_path), "--out", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    line_times: dict[int, float] = {}
    log: list[str] = []
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=flower_env(),
        cwd=REPO,
        start_new_session=True,
    )
    try:
        for line in proc.stdout:
            now = time.monotonic() - t0
            log.append(line)
            m = re.match(r"round (\d+)[:/]", line)
            if m:
                line_times[int(m.group(1))] = now
        rc = proc.wait(timeout=1800)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)  # the session holds Ray's processes too
            proc.wait()
    if rc != 0:
        raise RuntimeError(f"fedtune simulate failed ({rc}):\n{''.join(log[-30:])}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r["round"] >= 1]
    return {
        "seconds": [r["seconds"] for r in rounds],
        "line_intervals": [line_times[r] - line_times[r - 1] for r in range(1, len(rounds) + 1)],
        "clients": [[int(c["num-examples"]) for c in r["clients"]] for r in rounds],
        "wall_s": time.monotonic() - t0,
    }


def schedule_from(clients: list[list[int]], sizes: list[int]) -> tuple[list[list[int]], int]:
    """Partition ids per round from the example counts the simulation's clients reported."""
    by_size: dict[int, list[int]] = {}
    for pid, n in enumerate(sizes):
        by_size.setdefault(n, []).append(pid)
    out, ambiguous = [], 0
    for counts in clients:
        pids = []
        for n in counts:
            cands = [p for p in by_size[n] if p not in pids]
            ambiguous += len(by_size[n]) > 1
            pids.append(cands[0])
        out.append(sorted(pids))
    return out, ambiguous


def steady(seconds: list[float]) -> list[float]:
    return seconds[1:-1]  # rounds 2..R-1


def bench_preset(name: str, repeats: int, out: Path) -> dict:
    from fedtune import workspace

    config_path, overrides = PRESETS[name]
    overrides = COMMON + overrides
    cfg = load_cfg(config_path, overrides)
    cpus = cfg.simulation.cpus or os.cpu_count() or 1
    workers = max(1, int(cpus // cfg.simulation.cpus_per_client))
    threads = cfg.simulation.threads_per_client
    sizes = [len(p) for p in workspace.get(cfg).partitions()]
    workspace._CACHE.clear()
    runs = []
    for rep in range(repeats):
        with tempfile.TemporaryDirectory(prefix=f"overhead-{name}-") as tmp:
            fl = run_flower(config_path, overrides, Path(tmp) / "run")
        schedule, ambiguous = schedule_from(fl["clients"], sizes)
        schedule = schedule[:-1]  # the plain loop needs no final-evaluation round
        pp = run_plain(config_path, overrides, schedule, workers, threads)
        sq = run_sequential(config_path, overrides, schedule, threads)
        workspace._CACHE.clear()
        runs.append(
            {"flower": fl, "plain_procs": pp, "plain_seq": sq, "schedule": schedule, "ambiguous_matches": ambiguous}
        )
        print(
            f"[{name} repeat {rep + 1}] flower {fmt(steady(fl['seconds']))}  "
            f"plain-procs {fmt(pp['seconds'][1:])}  plain-seq {fmt(sq['seconds'][1:])}",
            flush=True,
        )
    fl_s = [s for r in runs for s in steady(r["flower"]["seconds"])]
    fl_line = [s for r in runs for s in steady(r["flower"]["line_intervals"])]
    pp_s = [s for r in runs for s in r["plain_procs"]["seconds"][1:]]
    sq_s = [s for r in runs for s in r["plain_seq"]["seconds"][1:]]
    med = statistics.median
    summary = {
        "preset": name,
        "config": config_path,
        "overrides": overrides,
        "clients_per_round": len(runs[0]["schedule"][0]),
        "local_steps": cfg.train.local_steps,
        "batch_size": cfg.train.batch_size,
        "workers": workers,
        "threads_per_client": threads,
        "rounds_counted_per_repeat": len(steady(runs[0]["flower"]["seconds"])),
        "repeats": repeats,
        "flower_round_s": med(fl_s),
        "flower_line_interval_s": med(fl_line),
        "plain_procs_round_s": med(pp_s),
        "plain_seq_round_s": med(sq_s),
        "ratio_flower_vs_plain_procs": med(fl_s) / med(pp_s),
        "ratio_flower_line_vs_plain_procs": med(fl_line) / med(pp_s),
        "ratio_flower_vs_plain_seq_ideal": med(fl_s) / (med(sq_s) / workers),
        "overhead_ms_per_round": 1000 * (med(fl_s) - med(pp_s)),
        "runs": runs,
    }
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1))
    return summary


def fmt(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"


def table(summaries: list[dict]) -> str:
    lines = [
        "| preset | clients/round x steps x batch | flower round (s) | flower round incl. checkpoint (s) "
        "| plain, workers (s) | plain, 1 process sequential (s) | flower / plain workers | flower / plain sequential "
        "| target <= 1.2x (vs workers) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        ratio = s["ratio_flower_vs_plain_procs"]
        lines.append(
            f"| {s['preset']} | {s['clients_per_round']} x {s['local_steps']} x {s['batch_size']} "
            f"| {s['flower_round_s']:.3f} | {s['flower_line_interval_s']:.3f} | {s['plain_procs_round_s']:.3f} "
            f"| {s['plain_seq_round_s']:.3f} | {ratio:.2f}x | {s['flower_round_s'] / s['plain_seq_round_s']:.2f}x "
            f"| {'met' if ratio <= 1.2 else 'not met'} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", action="append", choices=sorted(PRESETS), help="repeatable (default: tiny)")
    ap.add_argument("--repeats", type=int, default=1, help="simulation + plain runs per preset, alternating")
    ap.add_argument("--out", default="bench/results/overhead")
    args = ap.parse_args()
    from fedtune.env import setup_environment

    setup_environment()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for p in args.preset or ["tiny"]:
        bench_preset(p, args.repeats, out)
    # the table covers every preset measured into --out, this run's and earlier ones
    summaries = [json.loads((out / f"{p}.json").read_text()) for p in PRESETS if (out / f"{p}.json").is_file()]
    text = table(summaries)
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
