"""The ServerApp's round loop: sample, send the global adapter, decode and check
updates, aggregate with a Flower strategy, evaluate on the held-out split, write.

fedtune samples clients itself, with a generator seeded by (seed, round), so a run
is reproducible and a resumed run samples what the uninterrupted one would
have. Aggregation math is Flower's (the strategy's ``aggregate_train``): each
accepted reply is turned into global + delta before it reaches the strategy,
so FedAvg, FedAdam, Krum, ... all see ordinary model arrays.

With heterogeneous LoRA ranks (``aggregation.lora_mode = "hetero"``) each node
is sent the global cut to its rank (`HeteroRanks`), its reply is rebuilt as
the factors it trained, and `fedtune.aggregation.hetero_round` folds them into
the global, which stays at ``adapter.r``; the strategy then only averages metrics.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune import adapters, config, workspace
from fedtune.config import FedtuneConfig
from fedtune.delta import Delta
from fedtune.aggregation import Layout, validate_update
from fedtune.errors import FedtuneError, PayloadError
from fedtune.flower import protocol as P
from fedtune.flower.identity import NodeIdentities
from fedtune.flower.records import from_arrayrecord, to_arrayrecord, wire_bytes
from fedtune.flower.transport import send_and_receive
from fedtune.rundir import RunDir, replace_dir
from fedtune.workspace import export_adapter
from fedtune.metrics import held_out_metrics, run_summary

log = logging.getLogger("fedtune")



def sample_nodes(node_ids: Iterable[int], fraction: float, minimum: int, *, seed: int, rnd: int,
                 order: Callable[[Iterable[int]], list[int]] = sorted) -> list[int]:
    """Sample ``max(fraction * N, minimum)`` nodes, reproducibly from (seed, round).

    ``order`` puts the nodes in a run-independent order first (`NodeIdentities.order`:
    by partition id); picks index into that order.
    """
    nodes = list(order(node_ids))
    k = min(len(nodes), max(int(len(nodes) * fraction), minimum))
    rng = np.random.default_rng([seed, rnd])
    picks = rng.choice(len(nodes), size=k, replace=False)  # indices: node ids can exceed int64
    return sorted(nodes[int(i)] for i in picks)


class _FixedGrid:
    """Presents only the sampled nodes to a Flower strategy's ``configure_train``."""

    def __init__(self, node_ids: list[int]):
        self._ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._ids)


def build_strategy(cfg: FedtuneConfig) -> Strategy:
    """The Flower strategy named by ``[aggregation]`` (server optimizer or robust rule)."""
    from flwr.serverapp import strategy as fs

    agg = cfg.aggregation
    # fraction 1.0 over the already-sampled nodes: sampling is ours (see module doc)
    common = {"fraction_train": 1.0, "fraction_evaluate": 1.0, "min_train_nodes": 1, "min_available_nodes": 1}
    if agg.robust == "trimmed-mean":
        strategy = fs.FedTrimmedAvg(beta=agg.trim_beta, **common)
    elif agg.robust == "median":
        strategy = fs.FedMedian(**common)
    elif agg.robust == "krum":
        strategy = fs.Krum(num_malicious_nodes=agg.num_malicious, **common)
    elif agg.server_optimizer == "fedadam":
        strategy = fs.FedAdam(eta=agg.server_lr, beta_1=agg.beta_1, beta_2=agg.beta_2, tau=agg.tau, **common)
    elif agg.server_optimizer == "fedyogi":
        strategy = fs.FedYogi(eta=agg.server_lr, beta_1=agg.beta_1, beta_2=agg.beta_2, tau=agg.tau, **common)
    elif agg.server_optimizer == "fedavgm":
        strategy = fs.FedAvgM(server_learning_rate=agg.server_lr, server_momentum=agg.server_momentum, **common)
    elif agg.server_optimizer == "fedprox":
        strategy = fs.FedProx(proximal_mu=agg.proximal_mu, **common)
    else:
        strategy = fs.FedAvg(**common)
    strategy.fraction_evaluate = 0.0  # evaluation is centralized, on the held-out split (no warning)
    return strategy


class Broadcast:
    """Compressed downlink: every client tracks one *public* copy of the global adapter.

    Each round the server compresses ``global - public`` (so what compression
    dropped last round is sent again: error feedback on the downlink), applies the
    decoded change to ``public`` and keeps the payload. A client that holds version
    v receives the payloads v+1..r; a client with no copy, or too far behind, gets
    ``public`` in full. Clients train from ``public``; the server adds their deltas
    to the true global.
    """

    def __init__(self, cfg: FedtuneConfig, state: Delta, max_payloads: int = 32):
        from fedtune.compression import build_codec

        self.codec = build_codec(cfg.compression, "downlink")
        self.keys = sorted(state)
        self.public = {k: state[k].clone() for k in self.keys}
        self.payloads: dict[int, bytes] = {}
        self.version = 0
        self.node_version: dict[int, int] = {}
        self.max_payloads = max_payloads
        self.full_bytes = sum(v.numel() * 4 for v in self.public.values())

    def advance(self, rnd: int, state: Delta) -> None:
        change = {k: state[k] - self.public[k] for k in self.keys}
        payload = self.codec.encode(change, seed=0)
        decoded = self.codec.decode(payload, {k: tuple(v.shape) for k, v in change.items()}, seed=0)
        for k in self.keys:
            self.public[k] = self.public[k] + decoded[k]
        self.payloads[rnd] = payload
        self.payloads.pop(rnd - self.max_payloads, None)
        self.version = rnd

    def content_for(self, node: int, config: ConfigRecord) -> RecordDict:
        have = self.node_version.get(node)
        needed = list(range(have + 1, self.version + 1)) if have is not None else []
        if have is not None and all(r in self.payloads for r in needed):
            blobs = [self.payloads[r] for r in needed]
            if sum(map(len, blobs)) < self.full_bytes:
                down = ConfigRecord({"from-version": have, "payloads": blobs})
                return RecordDict({P.CONFIG: config, P.DOWNLINK: down})
        return RecordDict({P.CONFIG: config, P.ARRAYS: to_arrayrecord(self.public)})

    def acknowledge(self, node: int, rnd: int) -> None:
        self.node_version[node] = rnd


class HeteroRanks:
    """Heterogeneous LoRA ranks: the rank each node trains at, and the global cut to it.

    A node's rank is learned from its replies (the ``lora-rank`` metric). Until
    then it is sent the global at full rank and cuts it itself with the same
    function (`fedtune.aggregation.cut_to_rank`), so both sides agree on the
    factors it started from; from the next round on it is sent only its cut.
    """

    def __init__(self, scaling, global_rank: int):
        self.scaling = scaling
        self.global_rank = global_rank
        self.node_rank: dict[int, int] = {}
        self._sent: dict[int, int] = {}
        self._cuts: dict[tuple[int, int], Delta] = {}

    def begin_round(self, state: Delta) -> None:
        self._sent.clear()
        self._cuts = {(self.global_rank, self.global_rank): state}

    def _cut(self, src: int, rank: int) -> Delta:
        from fedtune.aggregation import cut_to_rank

        if (src, rank) not in self._cuts:
            self._cuts[(src, rank)] = cut_to_rank(self._cut(self.global_rank, src), rank, self.scaling)
        return self._cuts[(src, rank)]

    def content_for(self, node: int, config: ConfigRecord) -> RecordDict:
        rank = self.node_rank.get(node, self.global_rank)
        self._sent[node] = rank
        return RecordDict({P.CONFIG: config, P.ARRAYS: to_arrayrecord(self._cut(self.global_rank, rank))})

    def start_for(self, node: int, metrics) -> tuple[int, Delta]:
        """(rank, factors the node started from) for its reply; PayloadError if the rank is unusable."""
        raw = metrics.get("lora-rank")
        if not isinstance(raw, int) or isinstance(raw, bool) or not 1 <= raw <= self.global_rank:
            raise PayloadError(f"metrics 'lora-rank' must be an int in 1..{self.global_rank} (adapter.r), got {raw!r}")
        rank, sent = int(raw), self._sent[node]
        self.node_rank[node] = rank
        if rank > sent:  # it padded a rank-`sent` cut: not the T_rank(G) start hetero_round assumes
            raise PayloadError(f"trained at rank {rank} from factors sent at rank {sent}; it gets rank {rank} next round")
        return rank, self._cut(sent, rank)


class ServerLoop:
    """One federated run on a Flower ``Grid``."""

    def __init__(self, cfg: FedtuneConfig, out_dir: str | Path, progress: Callable[[str], None] | None = None,
                 *, resume: bool = False):
        self.cfg = cfg
        self.resume = resume
        self.run = RunDir(out_dir)
        self.progress = progress or (lambda s: log.info(s))
        self.strategy = build_strategy(cfg)
        self.identities = NodeIdentities()
        self.broadcast: Broadcast | None = None
        self.hetero: HeteroRanks | None = None
        self.worst_sample_eps = 0.0
        if cfg.compression.codec != "none":
            from fedtune.compression import build_codec

            self.uplink_codec = build_codec(cfg.compression, "uplink")

    # --- checkpoints -------------------------------------------------------------------
    def _save_checkpoint(self, rnd: int, state: Delta) -> None:
        """After every round, atomically: global adapter, strategy / accountant / broadcast state, round."""
        import pickle

        from safetensors.torch import save_file

        extras = {
            "strategy": {k: v for k, v in vars(self.strategy).items() if not callable(v)},
            "accountant": self.accountant.state_dict() if self.accountant is not None else None,
            "broadcast": vars(self.broadcast) if self.broadcast is not None else None,
            "hetero_node_rank": dict(self.hetero.node_rank) if self.hetero is not None else None,
            "worst_sample_eps": self.worst_sample_eps,
        }
        config_text = config.to_toml(self.cfg)

        def fill(tmp: Path) -> None:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "adapter_state.safetensors"))
            (tmp / "server_state.pkl").write_bytes(pickle.dumps(extras))
            (tmp / "config.toml").write_text(config_text)
            (tmp / "meta.json").write_text(json.dumps({"round": rnd, "format": 1}))

        replace_dir(self.run.path / "checkpoint", fill)

    def _load_checkpoint(self, state: Delta) -> dict | None:
        import pickle

        from safetensors.torch import load_file

        ckpt = self.run.path / "checkpoint"
        if not (ckpt / "meta.json").is_file():
            self.progress(f"no checkpoint in {ckpt}: starting from round 1")
            return None
        saved_cfg = config.load(ckpt / "config.toml")
        if saved_cfg.to_dict() != self.cfg.to_dict():
            raise FedtuneError(f"--resume: the config differs from the one in {ckpt / 'config.toml'}; resume with the same config")
        meta = json.loads((ckpt / "meta.json").read_text())
        loaded = load_file(str(ckpt / "adapter_state.safetensors"))
        if set(loaded) != set(state):
            raise FedtuneError(f"--resume: {ckpt} holds a different adapter")
        state.update(loaded)
        extras = pickle.loads((ckpt / "server_state.pkl").read_bytes())  # our own file, written above
        vars(self.strategy).update(extras["strategy"])
        if self.accountant is not None and extras["accountant"] is not None:
            self.accountant.load_state_dict(extras["accountant"])
        if self.broadcast is not None and extras["broadcast"] is not None:
            vars(self.broadcast).update(extras["broadcast"])
        if self.hetero is not None and extras.get("hetero_node_rank"):
            self.hetero.node_rank.update(extras["hetero_node_rank"])
        self.worst_sample_eps = extras["worst_sample_eps"]
        return meta

    def _privacy_summary(self) -> dict[str, Any]:
        priv = self.cfg.privacy
        out: dict[str, Any] = {"settings": priv.to_dict(), "order": "clip + noise before compression"}
        if self.accountant is not None:
            out["epsilon"] = self.accountant.epsilon()
            out["delta"] = priv.delta
            out["guarantee"] = "client-level" + (" (central, trusted server)" if priv.mode == "client-central" else " (local)")
        elif priv.mode == "sample":
            out["epsilon"] = self.worst_sample_eps
            out["delta"] = priv.delta
            out["guarantee"] = "example-level DP-SGD, worst client"
        else:
            out["epsilon"] = float("inf")
        return out

    def _privacy_accountant(self):
        """Client-level DP: the server's RDP accountant over rounds; refuses a run over budget."""
        priv = self.cfg.privacy
        if not priv.client_level:
            return None
        from fedtune.privacy import ClientLevelAccountant, check_budget_at_start

        fed = self.cfg.federation
        if priv.mode == "client-central":
            acc = ClientLevelAccountant.from_config(priv, sample_rate=fed.clients_per_round / fed.num_clients)
        else:
            acc = ClientLevelAccountant.from_config(priv)
        check_budget_at_start(priv, acc, fed.rounds)
        return acc

    def _lora_aggregator(self, ws: workspace.Workspace):
        mode = self.cfg.aggregation.lora_mode
        if mode == "naive" or self.cfg.adapter.method == "prompt":  # 'head' is refused any other mode
            return None  # Flower's strategy averages key by key
        from fedtune.aggregation import ExactLoRA, FactoredHeteroLoRA, FFALoRA, LoraScaling

        if mode == "ffa":
            return FFALoRA(atol=0.0)
        pcfg = ws.model.peft_config["default"]
        if mode == "hetero":
            return FactoredHeteroLoRA(LoraScaling.from_peft_config(pcfg), self.cfg.adapter.r)
        return ExactLoRA(LoraScaling.from_peft_config(pcfg), self.cfg.aggregation.rank)

    def decode_update(self, record, layout: dict[str, tuple[int, ...]], round_seed: int) -> Delta:
        """A client's delta from its ``update`` record; PayloadError if it is malformed."""
        if isinstance(record, ArrayRecord):
            if self.cfg.compression.codec != "none":
                raise PayloadError(f"expected a {self.cfg.compression.codec!r} payload, got dense arrays")
            return from_arrayrecord(record)
        if not isinstance(record, ConfigRecord) or "payload" not in record:
            raise PayloadError("update is neither arrays nor a codec payload")
        if self.cfg.compression.codec == "none" or record.get("codec") != self.uplink_codec.name:
            raise PayloadError(
                f"update uses codec {record.get('codec')!r}, this run expects {self.cfg.compression.codec!r}"
            )
        return self.uplink_codec.decode(bytes(record["payload"]), layout, seed=round_seed)

    def sample(self, grid: Grid, rnd: int) -> list[int]:
        """This round's clients: seeded by (federation.seed, round) over nodes ordered by partition id."""
        fed = self.cfg.federation
        if not fed.num_clients:
            return []
        available = grid.get_node_ids()
        self.identities.learn(grid, available, timeout=fed.round_timeout)
        return sample_nodes(available, fed.fraction_train, fed.min_train_clients, seed=fed.seed, rnd=rnd,
                            order=self.identities.order)

    def _evaluate(self, ws: workspace.Workspace, state: Delta, *, final: bool = True) -> dict[str, float]:
        """Held-out metrics; intermediate rounds may use a fixed prefix of the (shuffled) test split."""
        adapters.set_state_(ws.model, state)
        return held_out_metrics(ws, self.cfg, final=final)

    def main(self, grid: Grid) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.train.mode == "zo":
            from fedtune.flower.zo_server import run_zo

            return run_zo(self, grid)
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        t_start = time.monotonic()
        ws = workspace.get(cfg)
        state = ws.initial_state()
        keys = ws.trainable_keys()
        layout = {k: tuple(state[k].shape) for k in keys}
        expected = {k: (layout[k], torch.float32) for k in keys}
        self.lora_aggregator = self._lora_aggregator(ws)
        if cfg.aggregation.lora_mode == "hetero":
            self.hetero = HeteroRanks(self.lora_aggregator.scaling, cfg.adapter.r)
        n_params = sum(state[k].numel() for k in keys)
        self.accountant = self._privacy_accountant()
        if cfg.compression.downlink != "none":
            self.broadcast = Broadcast(cfg, state)
        start_round = 1
        ckpt_meta = self.run.path / "checkpoint" / "meta.json"
        if not self.resume and ckpt_meta.is_file() and not (self.run.path / "summary.json").is_file():
            done = json.loads(ckpt_meta.read_text()).get("round")
            raise FedtuneError(
                f"{self.run.path} holds an unfinished run (checkpoint after round {done}); resume it "
                "(fedtune simulate --resume, or resume=true in flwr's --run-config) or write to another directory"
            )
        resumed = self._load_checkpoint(state) if self.resume else None
        self.run.write_config(config.to_toml(cfg))
        if resumed is not None:
            start_round = resumed["round"] + 1
            self.run.reset_metrics(keep_rounds_upto=resumed["round"])
        else:
            self.run.reset_metrics()
        self.progress(
            f"model {cfg.model.name} ({ws.task}), adapter {cfg.adapter.method}: {n_params:,} trainable params "
            f"({4 * n_params / 1e6:.2f} MB fp32); {cfg.federation.num_clients} clients, "
            f"{cfg.federation.rounds} rounds, {len(ws.test_data())} held-out examples"
        )
        total_up = total_down = 0
        history: list[dict] = []
        if resumed is None:
            metrics = self._evaluate(ws, state, final=False)
            self.run.append_metrics({"round": 0, "eval": metrics, "bytes_up": 0, "bytes_down": 0})
            self.progress(f"round 0: {_fmt(metrics)}")
        else:
            history = [r for r in self.run.read_metrics() if r.get("round", 0) >= 1]
            total_up = sum(r["bytes_up"] for r in history)
            total_down = sum(r["bytes_down"] for r in history)
            metrics = next((r["eval"] for r in reversed(history) if "eval" in r), {})
            self.progress(f"resumed after round {resumed['round']} from {self.run.path / 'checkpoint'}")
        stopped = None
        for rnd in range(start_round, cfg.federation.rounds + 1):
            if self.accountant is not None:
                from fedtune.privacy import next_round_within_budget

                if not next_round_within_budget(cfg.privacy, self.accountant):
                    stopped = (f"privacy budget reached: epsilon {self.accountant.epsilon():.3f}, one more round "
                               f"would exceed privacy.epsilon_budget = {cfg.privacy.epsilon_budget}")
                    self.progress(f"stopping before round {rnd}: {stopped}")
                    break
            t0 = time.monotonic()
            node_ids = self.sample(grid, rnd)
            global_arrays = to_arrayrecord(state)
            round_seed = zlib.crc32(f"{cfg.federation.seed}/round/{rnd}".encode())
            train_cfg = ConfigRecord({"server-round": rnd, "round-seed": round_seed, "version": rnd})
            if cfg.aggregation.server_optimizer == "fedprox":
                train_cfg["proximal-mu"] = float(cfg.aggregation.proximal_mu or 0.0)
            msgs = list(self.strategy.configure_train(rnd, global_arrays, train_cfg, _FixedGrid(node_ids)))
            if self.broadcast is not None:
                self.broadcast.advance(rnd, state)
                for m in msgs:
                    m.content = self.broadcast.content_for(m.metadata.dst_node_id, m.content[P.CONFIG])
            if self.hetero is not None:
                self.hetero.begin_round(state)
                for m in msgs:
                    m.content = self.hetero.content_for(m.metadata.dst_node_id, m.content[P.CONFIG])
            down = {m.metadata.dst_node_id: wire_bytes(m.content) for m in msgs}
            replies = send_and_receive(grid, msgs, timeout=cfg.federation.round_timeout)
            accepted, rejected, up, client_metrics = [], [], {}, []
            record_extra: dict[str, Any] = {}
            decoded: list[tuple[Delta, Delta, float]] = []  # (delta, global + delta, weight) per accepted reply
            sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs if m.metadata.message_id}
            for r in replies:
                node = r.metadata.src_node_id
                if node not in node_ids:  # Flower's own error replies (node unavailable) come from the SuperLink
                    node = sent_to.get(r.metadata.reply_to_message_id, node)
                if r.has_error():
                    rejected.append({"node": node, "reason": _short_reason(r.error.reason)})
                    continue
                up[node] = wire_bytes(r.content)
                try:
                    m = r.content[P.METRICS]
                    start, node_expected = state, expected
                    if self.hetero is not None:
                        rank, start = self.hetero.start_for(node, m)
                        node_expected = Layout(expected).for_rank(rank)
                    node_layout = {k: shape for k, (shape, _) in node_expected.items()}
                    delta = self.decode_update(r.content[P.UPDATE], node_layout, round_seed)
                    validate_update(delta, node_expected, max_norm=cfg.aggregation.max_update_norm)
                    if float(m.get("num-examples", 0)) <= 0:
                        raise PayloadError("metrics have no positive 'num-examples'")
                except (PayloadError, KeyError, TypeError, ValueError) as exc:  # a bad update, never a crash
                    rejected.append({"node": node, "reason": str(exc)})
                    continue
                # the same keys, in the same order, as the global record the strategy saw
                full = {k: start[k] + delta[k] if k in delta else start[k] for k in start}
                # mixed ranks cannot be averaged array by array: the strategy gets the global
                # (and only aggregates the metrics), hetero_round aggregates the factors below
                arrays = global_arrays if self.hetero is not None else to_arrayrecord(full)
                r.content = RecordDict({P.ARRAYS: arrays, P.METRICS: m})
                accepted.append(r)
                decoded.append((delta, full, float(m["num-examples"])))
                if self.broadcast is not None:
                    self.broadcast.acknowledge(node, rnd)
                client_metrics.append({"node": node, **{k: float(v) for k, v in m.items()}})
            for rej in rejected:
                log.warning("round %d: update from node %s dropped: %s", rnd, rej["node"], rej["reason"])
            train_metrics: dict[str, float] = {}
            if accepted:
                agg, agg_metrics = self.strategy.aggregate_train(rnd, accepted)
                if cfg.privacy.mode == "client-central":
                    # DP-FedAvg (McMahan et al. 2018): clip each update, unweighted mean over the
                    # m sampled clients, Gaussian noise from a generator seeded by (seed, round)
                    from fedtune.privacy import private_mean

                    deltas = [delta for delta, _, _ in decoded]
                    noise_gen = torch.Generator().manual_seed(zlib.crc32(f"{cfg.federation.seed}/dp/{rnd}".encode()))
                    mean = private_mean(
                        deltas, clip_norm=cfg.privacy.clip_norm, noise_multiplier=cfg.privacy.noise_multiplier,
                        num_sampled_clients=len(msgs), generator=noise_gen,
                    )
                    state.update({k: state[k] + mean[k] for k in keys})
                elif self.lora_aggregator is not None:
                    # product-space LoRA averaging replaces the strategy's per-matrix mean
                    states = [full for _, full, _ in decoded]
                    weights = [w for _, _, w in decoded]
                    merged, report = self.lora_aggregator.aggregate(states, weights, reference=state)
                    state.update(merged)
                    record_extra["lora_truncation_residual"] = float(report.total_residual)
                elif agg is not None:
                    # Flower's adaptive optimizers (FedAdam, FedYogi, FedAdagrad) compute in float64;
                    # the global keeps its dtypes, or the next round's replies would not match them
                    state.update({k: v.to(state[k].dtype) for k, v in from_arrayrecord(agg).items()})
                train_metrics = {k: float(v) for k, v in (agg_metrics or MetricRecord()).items()}
            if self.accountant is not None:
                self.accountant.step()
                record_extra["dp_epsilon"] = self.accountant.epsilon()
            elif cfg.privacy.mode == "sample":
                eps = [c.get("dp-epsilon", float("nan")) for c in client_metrics]
                if eps:
                    record_extra["dp_epsilon_worst_client"] = max(eps)
                    self.worst_sample_eps = max(self.worst_sample_eps, max(eps))
            bytes_up, bytes_down = sum(up.values()), sum(down.values())
            total_up += bytes_up
            total_down += bytes_down
            record = round_record(rnd, len(msgs), len(accepted), rejected, train_metrics, up, down, client_metrics,
                                  **record_extra)
            last = rnd == cfg.federation.rounds
            if rnd % cfg.federation.eval_every == 0 or last:
                record["eval"] = metrics = self._evaluate(ws, state, final=last)
            record["seconds"] = time.monotonic() - t0
            self.run.append_metrics(record)
            history.append(record)
            self._save_checkpoint(rnd, state)
            self.progress(
                f"round {rnd}/{cfg.federation.rounds}: {len(accepted)}/{len(msgs)} clients"
                f"{' (' + str(len(rejected)) + ' dropped)' if rejected else ''}, "
                f"train loss {train_metrics.get('train_loss', float('nan')):.4f}, {_fmt(record.get('eval', {}))}, "
                f"up {_mb(bytes_up)}, down {_mb(bytes_down)}, {record['seconds']:.1f}s"
            )
        if not history or "eval" not in history[-1] or history[-1]["round"] != cfg.federation.rounds:
            metrics = self._evaluate(ws, state, final=True)  # stopped early: the full held-out split
        if cfg.output.save_adapter:
            export_adapter(ws, state, self.run.path / "adapter")
        summary = run_summary(
            cfg, ws.task, final=metrics, rounds_completed=len(history), total_bytes_up=total_up,
            total_bytes_down=total_down, trainable_params=n_params, seconds=time.monotonic() - t_start,
            aggregation={"strategy": type(self.strategy).__name__, **cfg.to_dict()["aggregation"]},
            privacy=self._privacy_summary(), stopped_early=stopped,
            records=[*self.run.read_metrics(), {"round": -1, "eval": metrics}],
        )
        self.run.write_summary(summary)
        priv = summary["privacy"]
        if cfg.privacy.enabled:
            self.progress(f"privacy: {priv['guarantee']}: (epsilon {priv['epsilon']:.3f}, delta {priv['delta']:g})")
        self.progress(
            f"done in {summary['seconds']:.0f}s: {_fmt(metrics)}; total up {_mb(total_up)}, down {_mb(total_down)}; "
            f"outputs in {self.run.path}"
        )
        return summary


def round_record(rnd: int, sampled: int, accepted: int, rejected: list[dict], train: dict[str, float],
                 up: dict[int, int], down: dict[int, int], clients: list[dict], **extra: Any) -> dict[str, Any]:
    """One metrics.jsonl row (the same fields in every training mode)."""
    return {
        "round": rnd, "sampled": sampled, "accepted": accepted, "rejected": rejected, "train": train,
        "bytes_up": sum(up.values()), "bytes_down": sum(down.values()),
        "bytes_up_per_client": {str(k): v for k, v in up.items()},
        "bytes_down_per_client": {str(k): v for k, v in down.items()},
        "clients": clients,
        **extra,
    }


def _short_reason(reason: str) -> str:
    """Ray wraps a client's exception in many lines; keep the exception's own last line."""
    lines = [ln.strip() for ln in str(reason).splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "unknown error"


def _fmt(metrics: dict[str, float]) -> str:
    if "accuracy" in metrics:
        return f"held-out accuracy {metrics['accuracy']:.4f} (macro-F1 {metrics['macro_f1']:.4f})"
    if "perplexity" in metrics:
        return f"held-out loss {metrics['loss']:.4f} (perplexity {metrics['perplexity']:.2f})"
    return "no eval"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"
