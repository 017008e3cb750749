"""Secure aggregation with Flower's SecAgg+ (``aggregation.secure = "secagg+"``).

SecAgg+ (Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", ePrint 2020/704) is Flower's own: ``SecAggPlusWorkflow`` on the server,
``secaggplus_mod`` on the client. In flwr 1.41 it runs only on Flower's legacy
workflow path (``DefaultWorkflow`` with a ``LegacyContext`` and a legacy
strategy), not with the Message-API strategies `fedtune.flower.server` uses, so
this mode has its own server loop and client over the same building blocks:

- client: a ``NumPyClient`` whose ``fit`` hands the legacy ``FitIns`` to
  fedtune's train handler (`fedtune.flower.client.handle_train`: local training,
  client-local or sample-level DP) and returns the delta of the trainable keys,
  sorted by name. ``secaggplus_mod`` quantizes it, weights it by
  ``num_examples / max_weight`` and masks it;
- server: SecAgg+ unmasks only the weighted sum, which it divides into the
  weighted mean of the deltas; `MeanDeltaFedAvg` samples with the loop's seeded
  `NodeSampler` and adds that mean to the global adapter. The run's bookkeeping
  (evaluation cadence, metrics rows, progress, privacy ledger, export, summary)
  is `fedtune.runlog.RunLog` and `fedtune.privacy.ledger.RunPrivacy`, as in
  `fedtune.flower.server.ServerLoop`.

What the server learns is the weighted mean of the sampled clients' deltas, plus
their example counts and train metrics (legacy ``FitRes`` metrics are not masked).
The ServerApp and ClientApp of `fedtune.flower.apps` switch to this path when
``aggregation.secure`` is set, so it runs under ``fedtune simulate``, ``flwr run``
and a deployment alike. Not supported: resume.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedtune import adapters, workspace
from fedtune.config import FedtuneConfig
from fedtune.delta import Delta
from fedtune.env import setup_environment
from fedtune.errors import FedtuneError
from fedtune.flower import protocol as P
from fedtune.flower.records import from_arrayrecord, to_arrayrecord
from fedtune.flower.server import NodeSampler, refuse_unfinished, round_seed
from fedtune.flower.transport import send_and_receive
from fedtune.metrics import held_out_metrics
from fedtune.privacy.ledger import RunPrivacy
from fedtune.runlog import RunLog, round_record
from fedtune.workspace import export_adapter

# ``fit`` config keys; the values are those `ServerLoop` sends in its ``config`` record
_FIT_KEYS = ("server-round", "round-seed", "version", "proximal-mu")


def fit_config(cfg: FedtuneConfig, rnd: int) -> dict[str, Any]:
    """The round's train config, as `ServerLoop` builds it (same round seed)."""
    out: dict[str, Any] = {"server-round": rnd, "round-seed": round_seed(cfg, rnd), "version": rnd}
    if cfg.aggregation.server_optimizer == "fedprox":
        out["proximal-mu"] = float(cfg.aggregation.proximal_mu or 0.0)
    return out


def train_delta(state: Delta, fit_cfg: dict[str, Any], context: Context, cfg: FedtuneConfig) -> tuple[Delta, dict]:
    """Run fedtune's train handler on ``state``; return (delta of the trainable keys, metrics)."""
    from fedtune.flower.client import handle_train

    content = RecordDict(
        {
            P.CONFIG: ConfigRecord({k: fit_cfg[k] for k in _FIT_KEYS if k in fit_cfg}),
            P.ARRAYS: to_arrayrecord(state),
        }
    )
    # the legacy FitIns arrived inside a Flower message; this local one only carries it to the handler
    meta = Metadata(
        run_id=context.run_id,
        message_id="",
        src_node_id=0,
        dst_node_id=context.node_id,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    msg = Message(content, metadata=meta)
    reply = handle_train(msg, context, cfg)
    return from_arrayrecord(reply.content[P.UPDATE]), dict(reply.content[P.METRICS])


class SecAggClient(NumPyClient):
    """Legacy client: parameters are the full adapter in sorted key order; fit returns the sorted delta."""

    def __init__(self, cfg: FedtuneConfig, context: Context):
        self.cfg = cfg
        self.flwr_context = context

    def fit(self, parameters, config):  # noqa: A002 (Flower's signature)
        setup_environment()
        keys = sorted(workspace.get(self.cfg).initial_state())
        if len(parameters) != len(keys):
            raise ValueError(f"server sent {len(parameters)} arrays, this adapter has {len(keys)}")
        state = {k: torch.from_numpy(np.asarray(a, dtype=np.float32).copy()) for k, a in zip(keys, parameters)}
        delta, metrics = train_delta(state, dict(config), self.flwr_context, self.cfg)
        n = int(metrics.pop("num-examples"))
        return [delta[k].numpy() for k in sorted(delta)], n, metrics


def handle_secagg_train(msg: Message, context: Context, cfg: FedtuneConfig) -> Message:
    """One SecAgg+ stage message: Flower's ``secaggplus_mod`` around the legacy `SecAggClient`.

    The ClientApp's ``train`` handler calls this when ``aggregation.secure`` is
    set, under ``fedtune simulate`` and ``flwr run`` alike; the mod keeps its
    protocol state in ``context.state`` (per node, across the stage messages).
    """
    from flwr.client.message_handler.message_handler import handle_legacy_message_from_msgtype

    def legacy(m: Message, ctx: Context) -> Message:
        return handle_legacy_message_from_msgtype(lambda c: SecAggClient(cfg, c).to_client(), m, ctx)

    return secaggplus_mod(msg, context, legacy)


class MeanDeltaFedAvg(FedAvg):
    """FedAvg over deltas: what SecAgg+ hands ``aggregate_fit`` is already their weighted mean.

    The strategy holds the global adapter; the aggregate it returns (and the
    workflow sends next round) is ``global + mean delta``. ``on_aggregate``
    (round, global before, mean delta) lets a caller see each step. ``sample``
    (round, available node ids) -> node ids picks each round's clients (default:
    Flower's own unseeded sampling).
    """

    def __init__(
        self,
        state: Delta,
        trainable: list[str],
        *,
        on_aggregate: Callable[[int, Delta, Delta], None] | None = None,
        sample: Callable[[int, list[int]], list[int]] | None = None,
        **kwargs,
    ):
        self.sample = sample
        self.keys = sorted(state)
        self.trainable = sorted(trainable)
        self.state = {k: state[k].clone() for k in self.keys}
        self.on_aggregate = on_aggregate
        self.last_round: dict[str, Any] = {}
        super().__init__(initial_parameters=ndarrays_to_parameters(self.ndarrays()), **kwargs)

    def ndarrays(self) -> list[np.ndarray]:
        return [self.state[k].numpy() for k in self.keys]

    def configure_fit(self, server_round, parameters, client_manager):
        if self.sample is None:
            return super().configure_fit(server_round, parameters, client_manager)
        fit_ins = FitIns(parameters, self.on_fit_config_fn(server_round) if self.on_fit_config_fn else {})
        _, min_num = self.num_fit_clients(client_manager.num_available())
        client_manager.wait_for(min_num)
        proxies = {int(p.node_id): p for p in client_manager.all().values()}
        return [(proxies[n], fit_ins) for n in self.sample(server_round, sorted(proxies))]

    def aggregate_fit(self, server_round, results, failures):
        params, metrics = super().aggregate_fit(server_round, results, failures)
        self.last_round = {
            "accepted": len(results),
            "rejected": [{"node": None, "reason": str(f)[:500]} for f in failures],
            "clients": [
                {"node": p.node_id, "num-examples": r.num_examples, **{k: float(v) for k, v in r.metrics.items()}}
                for p, r in results
            ],
        }
        if params is None:
            return None, {}
        mean = parameters_to_ndarrays(params)
        if len(mean) != len(self.trainable):
            raise FedtuneError(f"SecAgg+ returned {len(mean)} arrays for {len(self.trainable)} trainable keys")
        delta = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in zip(self.trainable, mean)}
        before = {k: v.clone() for k, v in self.state.items()}
        for k in self.trainable:
            self.state[k] = self.state[k] + delta[k].reshape(self.state[k].shape)
        if self.on_aggregate is not None:
            self.on_aggregate(server_round, before, delta)
        return ndarrays_to_parameters(self.ndarrays()), metrics


def _weighted_metrics(pairs: list[tuple[int, dict]]) -> dict[str, float]:
    total = sum(n for n, _ in pairs) or 1
    names = {
        k
        for _, m in pairs
        for k, v in m.items()
        # not train metrics: who replied, its weight, and the round it echoes (DeltaRounds strips it too)
        if isinstance(v, (int, float)) and k not in ("node", "num-examples", "partition-id", "server-round")
    }
    return {k: sum(n * float(m.get(k, 0.0)) for n, m in pairs) / total for k in sorted(names)}


class PromptGrid:
    """``grid`` whose ``send_and_receive`` collects replies as soon as they arrive
    (`fedtune.flower.transport.send_and_receive`) instead of Flower's 3 s polling in a
    deployment; everything else is the grid's own. SecAgg+ exchanges four messages a round."""

    def __init__(self, grid: Grid):
        self.grid = grid

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        return send_and_receive(self.grid, messages, timeout=timeout)


def run_secagg(
    grid: Grid,
    context: Context,
    cfg: FedtuneConfig,
    out_dir: str | Path,
    progress: Callable[[str], None] = print,
    on_aggregate: Callable[[int, Delta, Delta], None] | None = None,
) -> dict[str, Any]:
    """One federated run with SecAgg+; returns the summary (also in ``out_dir``/summary.json)."""
    agg, fed = cfg.aggregation, cfg.federation
    runlog = RunLog(cfg, out_dir, progress)
    refuse_unfinished(runlog.path, resume=False)
    privacy = RunPrivacy(cfg)
    sampler = NodeSampler(cfg)
    ws = workspace.get(cfg)
    state = ws.initial_state()
    trainable = ws.trainable_keys()
    n_params = sum(state[k].numel() for k in trainable)
    adapter_bytes = 4 * sum(v.numel() for v in state.values())

    def evaluate(final: bool) -> dict[str, float]:
        adapters.set_state_(ws.model, strategy.state)
        return held_out_metrics(ws, cfg, final=final)

    t_round = [time.monotonic()]

    def end_round(rnd: int, _ndarrays, _config):  # Flower's evaluate_fn: after round 0 (start) and each round
        if rnd > 0:
            info = strategy.last_round or {"accepted": 0, "rejected": [], "clients": []}
            strategy.last_round = {}
            # estimate: one fp32 adapter down and one fp32 delta up per client; SecAgg+'s key
            # exchange and its masked integer vectors are not counted
            up = {c["node"]: 4 * n_params for c in info["clients"]}
            down = {c["node"]: adapter_bytes for c in info["clients"]}
            train = _weighted_metrics([(int(c["num-examples"]), c) for c in info["clients"]])
            record = round_record(
                rnd,
                info["accepted"] + len(info["rejected"]),
                info["accepted"],
                info["rejected"],
                train,
                up,
                down,
                info["clients"],
                **privacy.end_round(info["clients"]),
            )
            runlog.end_round(record, t_round[0], evaluate)
        t_round[0] = time.monotonic()
        return None

    strategy = MeanDeltaFedAvg(
        state,
        trainable,
        on_aggregate=on_aggregate,
        sample=lambda rnd, ids: sampler.sample(grid, rnd, ids),
        fraction_fit=fed.fraction_train,
        min_fit_clients=fed.min_train_clients,
        min_available_clients=fed.min_available_clients,
        fraction_evaluate=0.0,
        min_evaluate_clients=0,
        evaluate_fn=end_round,
        on_fit_config_fn=lambda rnd: fit_config(cfg, rnd),
        fit_metrics_aggregation_fn=_weighted_metrics,
    )
    runlog.start(
        f"model {cfg.model.name} ({ws.task}), adapter {cfg.adapter.method}: {n_params:,} trainable params, "
        f"secure aggregation SecAgg+; {fed.num_clients} clients, {fed.rounds} rounds, "
        f"{len(ws.test_data())} held-out examples",
        evaluate,
    )
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=fed.rounds, round_timeout=fed.round_timeout), strategy=strategy
    )
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=agg.num_shares,
            reconstruction_threshold=agg.reconstruction_threshold,
            max_weight=agg.max_weight,
            clipping_range=agg.clipping_range,
            quantization_range=agg.quantization_range,
            timeout=fed.round_timeout,
        )
    )
    workflow(PromptGrid(grid), legacy)
    if len(runlog.rows) != fed.rounds:
        raise FedtuneError(f"SecAgg+ run ended after {len(runlog.rows)} of {fed.rounds} rounds; see Flower's log")
    return runlog.finish(
        ws.task,
        evaluate,
        lambda adapter_dir: export_adapter(ws, strategy.state, adapter_dir),
        trainable_params=n_params,
        aggregation={"strategy": "SecAgg+ (SecAggPlusWorkflow), FedAvg of deltas", **cfg.to_dict()["aggregation"]},
        privacy=privacy.summary(),
        mode="secagg+",
    )


__all__ = [
    "MeanDeltaFedAvg",
    "PromptGrid",
    "SecAggClient",
    "fit_config",
    "handle_secagg_train",
    "run_secagg",
    "train_delta",
]
