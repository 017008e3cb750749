"""Peak memory of one client round: zeroth-order (FedKSeed / MeZO) next to gradient (backprop).

MeZO (Malladi et al. 2023, arXiv:2305.17333) claims fine-tuning at inference-level
memory: a step is two forward passes with the parameters perturbed in place, so no
activations are kept for a backward pass and there is no gradient or optimizer state.
This measures that claim on fedtune's own client path: each mode runs in a fresh
subprocess that loads the model and the client's data (`fedtune.workspace`), builds the
round-1 train message the server would send, and calls `fedtune.flower.client.handle_train`
once through `fedtune.flower.local.LocalGrid` (node 1000, partition 0), as the ClientApp
does (``train.mode = "zo"`` dispatches to `fedtune.flower.zo_client.handle_train_zo`). Evaluation is server-side and not run.

Modes (each in its own process, one after another):

- ``grad``: ``train.local_steps = N`` AdamW steps (backprop) on the config's trainable adapter.
- ``zo``: ``train.mode = zo``, ``zo.local_steps = N`` MeZO steps (FedKSeed seeds).
- ``forward``: a reference, not a client path: N no-grad forward passes of the same loss
  on batches of the same size (the model in ``eval()``, under ``train.mixed_precision``),
  i.e. what inference costs.

Per mode: ``baseline`` = the process's RSS once the model, the client's data and the
message are in memory (every weight read once, since transformers memory-maps the
checkpoint and leaves unread weights out of RSS; then ``gc.collect`` and ``malloc_trim``,
so freed heap from loading does not count); ``load_peak`` = ``ru_maxrss`` at that point (loading can peak higher than
what stays resident); the peak is then reset (``/proc/self/clear_refs`` 5, Linux) so
``round_peak`` = the high-water mark after the round (``VmHWM``, which ``ru_maxrss``
reads) is the round's own, and
``round_above_baseline`` = ``round_peak - baseline``. ``process_peak`` = max of both peaks
(the ``ru_maxrss`` of the process without the reset). MB = 2**20 bytes. ``autocast``
says whether the model's forward passes actually ran under bf16 autocast (a forward
pre-hook on the base model), since that changes activation memory.

Usage (one torch thread; run under ``nice`` on a shared machine):

    nice .venv/bin/python bench/zo_memory.py --config simulations/configs/smollm2-sentiment.toml \
        --steps 4 --json bench/results/zo-memory/smollm2.json
    nice .venv/bin/python bench/zo_memory.py --config simulations/configs/default.toml --steps 4

``--set key=value`` (repeatable) is a fedtune config override applied to every mode
(e.g. ``--set train.mixed_precision=no``); ``--mode`` picks modes (default grad,zo,forward).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
MODES = ("grad", "zo", "forward")
MB = 2**20


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) * 1024 / MB if m else float("nan")


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # Linux: KiB


def _reset_peak() -> bool:
    """Reset the process's RSS high-water mark, VmHWM (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_mb("VmHWM") <= _status_mb("VmRSS") + 1.0


def _page_in_(model) -> None:
    """Read every weight once. transformers memory-maps safetensors checkpoints, so a loaded
    model's weights are not resident until a forward pass reads them: without this the
    round's first forward would count the whole model (about 500 MB for SmolLM2) as its own."""
    import torch

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.sum()


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def mode_overrides(mode: str, steps: int) -> dict:
    if mode == "zo":
        return {"train.mode": "zo", "train.lr_schedule": "constant", "zo.local_steps": steps}
    return {"train.local_steps": steps}  # grad, and forward (which takes N batches)


def measure(config_path: str, mode: str, steps: int, sets: list[str]) -> dict:
    """One mode in this process (call it in a fresh one): load, reset the peak, run one round."""
    import torch

    from fedtune import config, workspace
    from fedtune.config import LABEL_WORDS
    from fedtune.flower import protocol as P

    torch.set_num_threads(1)
    overrides = {
        **config.parse_overrides(sets),
        **mode_overrides(mode, steps),
        "simulation.threads_per_client": 1,
    }
    cfg = config.load(config_path, overrides)
    t0 = time.perf_counter()
    ws = workspace.get(cfg)
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from fedtune.flower.client import handle_train, local_data
    from fedtune.flower.local import LocalGrid
    from fedtune.flower.records import to_arrayrecord

    # LocalGrid: the in-process transport (sets the task identity messages need), node 1000 = partition 0
    grid = LocalGrid(cfg.federation.num_clients, lambda m, c: handle_train(m, c, cfg))
    context = grid.contexts[1000]
    pid, data = local_data(ws, context, cfg)
    content: dict = {P.CONFIG: ConfigRecord({"server-round": 1, "round-seed": 0, "version": 0})}
    if mode == "grad":
        initial = ws.initial_state()
        content[P.ARRAYS] = to_arrayrecord({k: initial[k] for k in ws.trainable_keys()})
    elif mode == "zo":
        from fedtune.flower.zo_client import DOWNLINK_KEY
        from fedtune.zo import SeedHistory, encode_downlink

        content[P.ZO] = ConfigRecord({DOWNLINK_KEY: encode_downlink(SeedHistory(cfg.zo.pool()), 0)})
    msg = Message(RecordDict(content), dst_node_id=1000, message_type=MessageType.TRAIN)
    load_s = time.perf_counter() - t0

    under_autocast: list[bool] = []
    shapes: list[tuple[int, ...]] = []  # padding is per batch: the longest batch sets the activations

    def seen(module, args, kwargs) -> None:
        under_autocast.append(torch.is_autocast_enabled(ws.device.type))
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            shapes.append(tuple(ids.shape))

    ws.model.get_base_model().register_forward_pre_hook(seen, with_kwargs=True)
    _page_in_(ws.model)
    _trim_heap()
    load_peak, baseline = _maxrss_mb(), _status_mb("VmRSS")
    baseline_parts = {"anon": _status_mb("RssAnon"), "file": _status_mb("RssFile")}
    reset = _reset_peak()
    t0 = time.perf_counter()
    if mode == "forward":
        loss = _forward_only(ws, data, cfg, steps)
        metrics = {"loss": loss}
    else:
        (reply,) = grid.send_and_receive([msg])
        if reply.has_error():
            raise RuntimeError(f"client round failed: {reply.error.reason}")
        metrics = dict(reply.content[P.METRICS])
    round_s = time.perf_counter() - t0
    # VmHWM is the ru_maxrss of this process's memory since the reset (ru_maxrss itself can also
    # keep the peak of a thread that exited before it)
    round_peak = _status_mb("VmHWM") if reset else _maxrss_mb()
    steps_key = "zo.local_steps" if mode == "zo" else "train.local_steps"
    return {
        "config": str(config_path),
        "model": cfg.model.name,
        "task": ws.task,
        "mode": mode,
        "steps": steps,
        "steps_key": steps_key,
        "batch_size": cfg.train.batch_size,
        "max_length": cfg.model.max_length,
        "label_words": ws.task == LABEL_WORDS,
        "mixed_precision": cfg.train.mixed_precision,
        "autocast": sorted(set(under_autocast)),
        "forward_passes": len(under_autocast),
        "max_batch_tokens": max((math.prod(x) for x in shapes), default=0),
        "max_seq_len": max((x[-1] for x in shapes), default=0),
        "trainable_params": sum(p.numel() for p in ws.model.parameters() if p.requires_grad),
        "partition_examples": len(data),
        "overrides": {k: v for k, v in overrides.items()},
        "baseline_rss_mb": round(baseline, 1),
        "baseline_anon_mb": round(baseline_parts["anon"], 1),
        "baseline_file_mb": round(baseline_parts["file"], 1),
        "load_peak_mb": round(load_peak, 1),
        "peak_reset": reset,
        "round_peak_mb": round(round_peak, 1),
        "round_above_baseline_mb": round(round_peak - baseline, 1),
        "process_peak_mb": round(max(load_peak, round_peak), 1),
        "ru_maxrss_end_mb": round(_maxrss_mb(), 1),
        "load_s": round(load_s, 1),
        "round_s": round(round_s, 1),
        "metrics": {k: (float(v) if isinstance(v, (int, float)) else str(v)) for k, v in metrics.items()},
    }


def _forward_only(ws, data, cfg, steps: int) -> float:
    """N no-grad forward passes of the training loss on fresh batches (the inference reference)."""
    import torch

    from fedtune.data import collate
    from fedtune.train import autocast, batch_loss, batch_stream

    stream = batch_stream(data, cfg.train.batch_size, torch.Generator().manual_seed(0))
    ws.model.eval()
    losses = []
    with torch.no_grad():
        for _ in range(steps):
            batch = {k: v.to(ws.device) for k, v in collate(next(stream), ws.pad_id, ws.task).items()}
            with autocast(ws.device, cfg.train.mixed_precision):
                losses.append(float(batch_loss(ws.model, batch, None)))
    return sum(losses) / len(losses)


def run_child(args, mode: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--config", args.config]
    cmd += ["--steps", str(args.steps)] + [x for s in args.set for x in ("--set", s)]
    env = {**os.environ, **ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{mode}: child exited with {done.returncode}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["process_s"] = round(time.perf_counter() - t0, 1)
    return row


def table(rows: list[dict]) -> str:
    head = "| model | mode | steps | batch | autocast | baseline RSS MB | peak RSS MB | round above baseline MB | round s |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        ac = "/".join("bf16" if a else "fp32" for a in r["autocast"]) or "-"
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['steps']} | {r['batch_size']} | {ac} | {r['baseline_rss_mb']:.0f} "
            f"| {r['process_peak_mb']:.0f} | {r['round_above_baseline_mb']:.0f} | {r['round_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "simulations/configs/smollm2-sentiment.toml"))
    p.add_argument("--steps", type=int, default=4, help="local steps (train.local_steps / zo.local_steps)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fedtune config override")
    p.add_argument("--mode", default=",".join(MODES), help=f"comma-separated, from {','.join(MODES)}")
    p.add_argument("--json", metavar="OUT", help="write the rows here")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps: at least 1 (got {args.steps})")
    if args.child:
        os.environ.update(ENV)
        print(json.dumps(measure(args.config, args.child, args.steps, args.set)), flush=True)
        return
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"--mode: unknown {bad} (choose from {', '.join(MODES)})")
    rows = []
    for mode in modes:
        rows.append(run_child(args, mode))
        r = rows[-1]
        print(
            f"{r['model']} {mode}: baseline {r['baseline_rss_mb']:.0f} MB, load peak {r['load_peak_mb']:.0f} MB, "
            f"round peak {r['round_peak_mb']:.0f} MB (+{r['round_above_baseline_mb']:.0f}), "
            f"autocast {r['autocast']}, longest batch {r['max_seq_len']} tokens, round {r['round_s']} s, process {r['process_s']} s",
            flush=True,
        )
    print(table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
