"""The ServerApp's round loop in zeroth-order mode (FedKSeed): the history is the model.

FedKSeed: Qin et al. 2024, arXiv:2312.06353. Each round the server samples nodes
(`ServerLoop.sample`, seeded by (seed, round) over nodes ordered by partition id), sends each one the
rounds of the seed history it lacks (never a tensor), receives (seed index, scalar)
pairs, drops malformed ones, aggregates them into one round entry weighted by
num-examples (`fedtune.zo.aggregate_pairs`: FedAvg of the local updates), appends it
to the history and replays it onto its own copy of the tuned parameters to evaluate
on the held-out split. Outputs follow the backprop loop (`ServerLoop.main`):
metrics.jsonl rows with the same fields, summary.json, the exported adapter, plus
``zo_history.bin`` (`fedtune.zo.encode_history`): with the initial model it *is*
the tuned model, including base weights when ``zo.scope = "full"``, which the PEFT
adapter export does not hold.

Resume (``ServerLoop(..., resume=True)``): the history file is the checkpoint; it is
written after each round's metrics row, so the run continues after its last round.

Which round each node holds is tracked here: a node that answered round r (even with
an update that was then dropped) holds rounds 1..r-1; a node that answered with an
error, or was never seen, gets the whole history from round 1 (its client replays
from the initial model).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedtune import adapters, config, workspace
from fedtune.errors import ConfigError, FedtuneError, PayloadError
from fedtune.flower import protocol as P
from fedtune.flower.records import wire_bytes
from fedtune.flower.transport import send_and_receive
from fedtune.metrics import run_summary
from fedtune.flower.server import _fmt, _mb, _short_reason, export_adapter, round_record
from fedtune.flower.zo_client import DOWNLINK_KEY, UPLINK_KEY, initial_params, load_params_, read_params
from fedtune.rundir import atomic_write_bytes
from fedtune.zo import RoundEntry, SeedHistory, aggregate_pairs, decode_uplink, encode_downlink, replay_

if TYPE_CHECKING:
    from fedtune.flower.server import ServerLoop

log = logging.getLogger("fedtune")

HISTORY_FILE = "zo_history.bin"


def check_zo_config(cfg) -> None:
    """Refuse settings the zeroth-order loop would otherwise ignore silently (all at once)."""
    errors = []
    if cfg.train.mode != "zo":
        errors.append(f"train.mode: run_zo needs 'zo', got {cfg.train.mode!r}")
    if cfg.privacy.enabled:
        errors.append(f"privacy.mode: {cfg.privacy.mode!r} is not implemented for zeroth-order mode; use 'none'")
    agg = cfg.aggregation
    if agg.robust != "none" or agg.server_optimizer != "fedavg":
        errors.append("aggregation: zeroth-order mode averages scalars (FedAvg); set robust = 'none' and "
                      f"server_optimizer = 'fedavg' (got {agg.robust!r}, {agg.server_optimizer!r})")
    if agg.max_update_norm is not None:
        errors.append("aggregation.max_update_norm: not used in zeroth-order mode; bound scalars with zo.grad_clip")
    if cfg.compression.downlink != "none":
        errors.append("compression.downlink: zeroth-order mode already sends only (seed, scalar) pairs; set it to 'none'")
    if cfg.zo.scope == "full" and cfg.model.quantization != "none":
        errors.append(f"zo.scope: 'full' would perturb {cfg.model.quantization} quantized base weights; use 'adapter'")
    if errors:
        raise ConfigError("; ".join(errors))


def decode_reply(content: RecordDict, cfg) -> tuple[list[tuple[int, float]], float]:
    """(pairs, weight) from a client's reply; `PayloadError` says why it is dropped."""
    try:
        payload = content[P.ZO][UPLINK_KEY]
        metrics = content[P.METRICS]
        weight = float(metrics["num-examples"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PayloadError(f"reply lacks the zo uplink or num-examples: {exc!r}") from None
    if not isinstance(payload, bytes):
        raise PayloadError(f"zo uplink must be bytes, got {type(payload).__name__}")
    if not (math.isfinite(weight) and weight > 0):
        raise PayloadError(f"metrics have no positive finite 'num-examples' (got {weight})")
    pairs = decode_uplink(payload, cfg.zo.pool(), max_pairs=cfg.zo.local_steps)
    clip = cfg.zo.grad_clip
    if clip > 0 and any(abs(s) > clip for _, s in pairs):
        raise PayloadError(f"a scalar exceeds zo.grad_clip = {clip} (clients skip such steps)")
    return pairs, weight


def run_zo(loop: ServerLoop, grid: Grid) -> dict[str, Any]:
    """The FedKSeed round loop on ``loop``'s config and run directory; returns the summary."""
    cfg = loop.cfg
    check_zo_config(cfg)
    zo, fed = cfg.zo, cfg.federation
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t_start = time.monotonic()
    ws = workspace.get(cfg)
    pool = zo.pool()
    initial = initial_params(ws, zo.scope)
    current = {k: v.clone() for k, v in initial.items()}
    history = _resumed_history(loop) if getattr(loop, "resume", False) else None
    if history is None:
        history = SeedHistory(pool)
    start = len(history) + 1
    node_round: dict[int, int] = {}  # after a resume every node gets the whole history once
    n_params = sum(v.numel() for v in current.values())
    loop.run.write_config(config.to_toml(cfg))
    loop.run.reset_metrics(keep_rounds_upto=len(history) if start > 1 else None)

    def global_state() -> dict[str, torch.Tensor]:
        load_params_(ws, zo.scope, current)  # the shared model may hold a client's local model
        return adapters.get_state(ws.model)

    loop.progress(
        f"model {cfg.model.name} ({ws.task}), zeroth-order FedKSeed, scope {zo.scope}: {n_params:,} tuned params, "
        f"K={zo.num_seeds}, {zo.local_steps} local steps{' (Pro)' if zo.pro else ''}; "
        f"{fed.num_clients} clients, {fed.rounds} rounds, {len(ws.test_data())} held-out examples"
    )
    total_up = total_down = 0
    rows: list[dict] = []
    if start == 1:
        metrics = loop._evaluate(ws, global_state(), final=False)
        loop.run.append_metrics({"round": 0, "eval": metrics, "bytes_up": 0, "bytes_down": 0})
        loop.progress(f"round 0: {_fmt(metrics)}")
    else:
        replay_(load_params_(ws, zo.scope, current), history, lr=zo.lr)
        current = read_params(ws, zo.scope)
        rows = [r for r in loop.run.read_metrics() if r.get("round", 0) >= 1]
        total_up, total_down = sum(r["bytes_up"] for r in rows), sum(r["bytes_down"] for r in rows)
        metrics = next((r["eval"] for r in reversed(rows) if "eval" in r), {})
        loop.progress(f"resumed after round {len(history)} from {loop.run.path / HISTORY_FILE}")
    for rnd in range(start, fed.rounds + 1):
        t0 = time.monotonic()
        node_ids = loop.sample(grid, rnd)
        msgs = [
            Message(
                RecordDict({
                    P.CONFIG: ConfigRecord({"server-round": rnd}),
                    P.ZO: ConfigRecord({DOWNLINK_KEY: encode_downlink(history, node_round.get(node, 0))}),
                }),
                dst_node_id=node, message_type=MessageType.TRAIN,
            )
            for node in node_ids
        ]
        down = {m.metadata.dst_node_id: wire_bytes(m.content) for m in msgs}
        replies = send_and_receive(grid, msgs, timeout=fed.round_timeout)
        accepted: list[list[tuple[int, float]]] = []
        weights: list[float] = []
        rejected: list[dict] = []
        up: dict[int, int] = {}
        client_metrics: list[dict] = []
        for r in replies:
            node = r.metadata.src_node_id
            if r.has_error():
                node_round.pop(node, None)  # its state is unknown: send everything next time
                rejected.append({"node": node, "reason": _short_reason(r.error.reason)})
                continue
            node_round[node] = rnd - 1
            up[node] = wire_bytes(r.content)
            try:
                pairs, weight = decode_reply(r.content, cfg)
            except PayloadError as exc:
                rejected.append({"node": node, "reason": str(exc)})
                continue
            accepted.append(pairs)
            weights.append(weight)
            client_metrics.append({"node": node, **{k: float(v) for k, v in r.content[P.METRICS].items()}})
        for rej in rejected:
            log.warning("round %d: update from node %s dropped: %s", rnd, rej["node"], rej["reason"])
        record_extra: dict[str, Any] = {}
        entry = RoundEntry.empty()
        if accepted:
            try:
                entry = aggregate_pairs(accepted, weights, pool.num_seeds)
            except PayloadError as exc:  # a float32 overflow of the mean: skip the round, keep the run
                record_extra["aggregation_error"] = str(exc)
                log.warning("round %d: aggregation failed, round left empty: %s", rnd, exc)
        history.append_(entry)
        replay_(load_params_(ws, zo.scope, current), history, rnd - 1, rnd, lr=zo.lr)
        current = read_params(ws, zo.scope)
        train_metrics = _weighted_mean(client_metrics, "train_loss")
        bytes_up, bytes_down = sum(up.values()), sum(down.values())
        total_up += bytes_up
        total_down += bytes_down
        record = round_record(
            rnd, len(msgs), len(accepted), rejected, train_metrics, up, down, client_metrics,
            zo={"pairs": entry.nnz, "history_rounds": len(history)}, **record_extra,
        )
        last = rnd == fed.rounds
        if rnd % fed.eval_every == 0 or last:
            record["eval"] = metrics = loop._evaluate(ws, global_state(), final=last)
        record["seconds"] = time.monotonic() - t0
        loop.run.append_metrics(record)
        # after the row: a history of R rounds on disk means rounds 1..R are complete (resume)
        atomic_write_bytes(loop.run.path / HISTORY_FILE, history.to_bytes())
        rows.append(record)
        loop.progress(
            f"round {rnd}/{fed.rounds}: {len(accepted)}/{len(msgs)} clients"
            f"{' (' + str(len(rejected)) + ' dropped)' if rejected else ''}, "
            f"train loss {train_metrics.get('train_loss', float('nan')):.4f}, {_fmt(record.get('eval', {}))}, "
            f"up {_mb(bytes_up)}, down {_mb(bytes_down)}, {record['seconds']:.1f}s"
        )
    state = global_state()
    if not rows or "eval" not in rows[-1]:
        metrics = loop._evaluate(ws, state, final=True)
    if cfg.output.save_adapter:
        export_adapter(ws, state, loop.run.path / "adapter")
    summary = run_summary(
        cfg, ws.task, final=metrics, rounds_completed=len(rows), total_bytes_up=total_up, total_bytes_down=total_down,
        trainable_params=n_params, seconds=time.monotonic() - t_start,
        adapter_bytes_fp32=4 * sum(state[k].numel() for k in ws.trainable_keys()),
        aggregation={"strategy": "FedKSeed (weighted mean of scalars)"},
        privacy={"settings": cfg.privacy.to_dict(), "epsilon": float("inf")},
        zo=zo.to_dict(),
        zo_history={
            "rounds": len(history),
            "pairs": sum(e.nnz for e in history.entries),
            "bytes": len(history.to_bytes()),
            "file": HISTORY_FILE,
        },
    )
    loop.run.write_summary(summary)
    loop.progress(
        f"done in {summary['seconds']:.0f}s: {_fmt(metrics)}; total up {_mb(total_up)}, down {_mb(total_down)}; "
        f"history {len(history)} rounds, {summary['zo_history']['bytes']} bytes; outputs in {loop.run.path}"
    )
    return summary


def _resumed_history(loop: ServerLoop) -> SeedHistory | None:
    """The history a previous run in ``loop.run`` wrote, if any; the config must be the same."""
    path, cfg_path = loop.run.path / HISTORY_FILE, loop.run.path / "config.toml"
    if not path.is_file():
        loop.progress(f"no {HISTORY_FILE} in {loop.run.path}: starting from round 1")
        return None
    if not cfg_path.is_file() or config.load(cfg_path).to_dict() != loop.cfg.to_dict():
        raise FedtuneError(f"--resume: the config differs from {cfg_path}; resume with the same config")
    history = SeedHistory.from_bytes(path.read_bytes(), loop.cfg.zo.pool())
    if len(history) > loop.cfg.federation.rounds:
        raise FedtuneError(f"--resume: {path} holds {len(history)} rounds, more than federation.rounds")
    return history


def _weighted_mean(client_metrics: list[dict], key: str) -> dict[str, float]:
    rows = [(c["num-examples"], c[key]) for c in client_metrics if key in c and math.isfinite(c[key])]
    total = math.fsum(w for w, _ in rows)
    return {key: math.fsum(w * v for w, v in rows) / total} if total > 0 else {}


__all__ = ["run_zo", "check_zo_config", "decode_reply", "HISTORY_FILE"]
