"""Secure aggregation with Flower's SecAgg+ (``aggregation.secure = "secagg+"``).

SecAgg+ (Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", ePrint 2020/704) is Flower's own: ``SecAggPlusWorkflow`` on the server,
``secaggplus_mod`` on the client. In flwr 1.41 it runs only on Flower's legacy
workflow path (``DefaultWorkflow`` with a ``LegacyContext`` and a legacy
strategy), not with the Message-API strategies `fedtune.flower.server` uses, so
this mode has its own server loop and client over the same building blocks:

- client: a ``NumPyClient`` whose ``fit`` hands the legacy ``FitIns`` to
  fedtune's train handler (`fedtune.flower.client.handle_train`: local training,
  client-local or sample-level DP) and returns one float32 vector: the delta of
  the trainable keys, sorted by name, through `SharedRandK` (all of it, or with
  ``compression.codec = "randk"`` the ``k`` coordinates of each tensor that the
  round seed picks, the same for every client). ``secaggplus_mod`` weights it
  by ``weight / max_weight`` (`secagg_weight`: ``num_examples``, or the same for
  every client under ``aggregation.weighting = "uniform"``), quantizes and
  masks it; `handle_secagg_train` then packs the masked residues at
  ``log2(modulus_range)`` bits each (`fedtune.compression.masked.pack_residues`)
  instead of Flower's int64;
- server: `SecAggWire` measures every message of the four stages per node and
  widens the packed residues back to the int64 arrays Flower's workflow sums (a
  malformed one becomes that client's error reply: it drops out, SecAgg+
  removes its masks, the round goes on). SecAgg+ unmasks only the weighted sum,
  which it divides into the weighted mean; `MeanDeltaFedAvg` samples with the
  loop's seeded `NodeSampler`, scatters the mean back into the full layout
  (``n/k`` scaled if ``compression.randk_unbiased``) and adds it to the global
  adapter. The run's bookkeeping (evaluation cadence, metrics rows, progress,
  privacy ledger, export, summary) is `fedtune.runlog.RunLog` and
  `fedtune.privacy.ledger.RunPrivacy`, as in `fedtune.flower.server.ServerLoop`;
  the rows' bytes are the measured sizes of the messages (``bytes_by_stage``
  splits them by SecAgg+ stage).

What the server learns is the weighted mean of the sampled clients' deltas (on the
round's ``k`` coordinates with rand-k), plus their example counts and train metrics
(legacy ``FitRes`` metrics are not masked).
The ServerApp and ClientApp of `fedtune.flower.apps` switch to this path when
``aggregation.secure`` is set, so it runs under ``fedtune simulate``, ``flwr run``
and a deployment alike. Not supported: resume.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    Error,
    FitIns,
    bytes_to_ndarray,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedtune import adapters, workspace
from fedtune.compression import CompressionConfig
from fedtune.compression.masked import SharedRandK, pack_residues, residue_bits, unpack_residues
from fedtune.config import FedtuneConfig
from fedtune.delta import Delta
from fedtune.env import setup_environment
from fedtune.errors import FedtuneError, PayloadError
from fedtune.flower import protocol as P
from fedtune.flower.records import from_arrayrecord, to_arrayrecord, wire_bytes
from fedtune.flower.server import NodeSampler, refuse_unfinished, round_seed
from fedtune.flower.transport import send_and_receive
from fedtune.metrics import held_out_metrics
from fedtune.privacy.ledger import RunPrivacy
from fedtune.runlog import RunLog, round_record, short_reason
from fedtune.workspace import export_adapter

# ``fit`` config keys; the values are those `ServerLoop` sends in its ``config`` record
_FIT_KEYS = ("server-round", "round-seed", "version", "proximal-mu")


def fit_config(cfg: FedtuneConfig, rnd: int) -> dict[str, Any]:
    """The round's train config, as `ServerLoop` builds it (same round seed)."""
    out: dict[str, Any] = {"server-round": rnd, "round-seed": round_seed(cfg, rnd), "version": rnd}
    if cfg.aggregation.server_optimizer == "fedprox":
        out["proximal-mu"] = float(cfg.aggregation.proximal_mu or 0.0)
    return out


def masked_codec(cfg: FedtuneConfig) -> SharedRandK:
    """What each client hands SecAgg+: the ``k`` coordinates a tensor the round seed picks with
    ``compression.codec = "randk"``, else the whole delta (config validation refuses other codecs)."""
    comp = cfg.compression
    if comp.codec == "randk":
        return SharedRandK(comp.ratio, unbiased=comp.randk_unbiased)
    return SharedRandK(1.0)


def layouts(cfg: FedtuneConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(the adapter's layout, its trainable keys' layout), keys sorted: the order of the vectors on the wire."""
    ws = workspace.get(cfg)
    state, trainable = ws.initial_state(), set(ws.trainable_keys())
    full = {k: tuple(state[k].shape) for k in sorted(state)}
    return full, {k: s for k, s in full.items() if k in trainable}


def flatten(state: Mapping[str, torch.Tensor]) -> np.ndarray:
    """``state``'s tensors, in its order, as one float32 vector (one Flower array, not one a tensor)."""
    parts = [v.detach().to("cpu", torch.float32).reshape(-1).numpy() for v in state.values()]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def unflatten(vector: np.ndarray, layout: Mapping[str, tuple[int, ...]]) -> Delta:
    """Inverse of `flatten` for ``layout``; `PayloadError` if the lengths differ."""
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    sizes = [math.prod(s) for s in layout.values()]
    if vector.size != sum(sizes):
        raise PayloadError(f"{vector.size} values for a layout of {sum(sizes)}")
    out, at = {}, 0
    for (key, shape), n in zip(layout.items(), sizes):
        out[key] = torch.from_numpy(vector[at : at + n].copy()).reshape(shape)
        at += n
    return out


def check_weight(num_examples: int, cfg: FedtuneConfig) -> None:
    """Refuse a client weight that could make SecAgg+'s masked sum wrap around ``modulus_range``.

    ``secaggplus_mod`` sends ``round(num_examples / max_weight * quantization_range)``
    as the first masked entry (Flower only warns above ``max_weight``). Config
    validation keeps every quantized delta entry at most ``(modulus - 1) // m`` for
    the ``m`` clients of a round; a weight factor within that bound too keeps the
    sum of ``m`` of them below the modulus.
    """
    agg, m = cfg.aggregation, cfg.federation.clients_per_round
    factor = round(num_examples / agg.max_weight * agg.quantization_range)
    if factor > (agg.modulus_range - 1) // m:
        raise FedtuneError(
            f"aggregation.max_weight: this client's {num_examples} examples / max_weight {agg.max_weight:g} x "
            f"quantization_range {agg.quantization_range} = {factor} would let the masked sum of {m} clients wrap "
            f"aggregation.modulus_range = {agg.modulus_range}; raise aggregation.max_weight or modulus_range"
        )


def secagg_weight(num_examples: int, cfg: FedtuneConfig) -> int:
    """The weight a client hands ``secaggplus_mod`` (Flower's ``FitRes.num_examples``, an int).

    ``aggregation.weighting = "examples"``: its example count. ``"uniform"``: the same for
    every client, so SecAgg+'s weighted mean is the plain mean (`AggregationConfig.client_weight`
    up to a common factor). That weight is ``max_weight`` (rounded down, at least 1) rather than
    1 because the mod quantizes ``delta * weight / max_weight`` on a grid of step
    ``2 * clipping_range / quantization_range``: a factor of 1 keeps the delta's precision, where
    ``1 / max_weight`` (1/1000 by default) would make the grid that much coarser relative to it.
    """
    if cfg.aggregation.weighting == "uniform":
        return max(1, int(cfg.aggregation.max_weight))
    return int(num_examples)


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
    # the dense delta: rand-k under SecAgg+ is `masked_codec`'s, applied to the vector SecAgg+ masks
    reply = handle_train(msg, context, dataclasses.replace(cfg, compression=CompressionConfig()))
    return from_arrayrecord(reply.content[P.UPDATE]), dict(reply.content[P.METRICS])


class SecAggClient(NumPyClient):
    """Legacy client: parameters are the full adapter flattened in sorted key order (one array); fit
    returns the `masked_codec` vector of the trainable keys' delta (one array)."""

    def __init__(self, cfg: FedtuneConfig, context: Context):
        self.cfg = cfg
        self.flwr_context = context

    def fit(self, parameters, config):  # noqa: A002 (Flower's signature)
        setup_environment()
        full, trainable = layouts(self.cfg)
        if len(parameters) != 1:
            raise ValueError(f"server sent {len(parameters)} arrays, expected the adapter as one vector")
        state = unflatten(parameters[0], full)
        delta, metrics = train_delta(state, dict(config), self.flwr_context, self.cfg)
        n = int(metrics["num-examples"])  # stays in the (unmasked) metrics: the round row's count
        weight = secagg_weight(n, self.cfg)
        check_weight(weight, self.cfg)
        values = masked_codec(self.cfg).encode({k: delta[k] for k in trainable}, seed=int(config["round-seed"]))
        return [values], weight, metrics


def handle_secagg_train(msg: Message, context: Context, cfg: FedtuneConfig) -> Message:
    """One SecAgg+ stage message: Flower's ``secaggplus_mod`` around the legacy `SecAggClient`.

    The ClientApp's ``train`` handler calls this when ``aggregation.secure`` is
    set, under ``fedtune simulate`` and ``flwr run`` alike; the mod keeps its
    protocol state in ``context.state`` (per node, across the stage messages).
    The masked vectors of the reply go out packed at ``log2(modulus_range)`` bits
    an entry rather than as Flower's int64 ``.npy`` arrays.
    """
    from flwr.client.message_handler.message_handler import handle_legacy_message_from_msgtype

    def legacy(m: Message, ctx: Context) -> Message:
        return handle_legacy_message_from_msgtype(lambda c: SecAggClient(cfg, c).to_client(), m, ctx)

    reply = secaggplus_mod(msg, context, legacy)
    configs = reply.content.config_records.get(RECORD_KEY_CONFIGS) if reply.has_content() else None
    if configs is not None and Key.MASKED_PARAMETERS in configs:
        bits = residue_bits(cfg.aggregation.modulus_range)
        configs[Key.MASKED_PARAMETERS] = [
            pack_residues(bytes_to_ndarray(b), bits) for b in configs[Key.MASKED_PARAMETERS]
        ]
    return reply


class MeanDeltaFedAvg(FedAvg):
    """FedAvg over deltas: what SecAgg+ hands ``aggregate_fit`` is already their weighted mean.

    The strategy holds the global adapter and sends it as one flattened vector
    (keys sorted). What SecAgg+ returns is the mean of the clients' ``codec``
    vectors; ``codec.decode`` (seeded by ``seed_of(round)``) scatters it back into
    the trainable keys' layout, and the aggregate the strategy returns (and the
    workflow sends next round) is ``global + mean delta``. ``on_aggregate`` (round,
    global before, mean delta) lets a caller see each step. ``sample`` (round,
    available node ids) -> node ids picks each round's clients (default: Flower's
    own unseeded sampling).
    """

    def __init__(
        self,
        state: Delta,
        trainable: list[str],
        *,
        codec: SharedRandK | None = None,
        seed_of: Callable[[int], int] = lambda rnd: 0,
        on_aggregate: Callable[[int, Delta, Delta], None] | None = None,
        sample: Callable[[int, list[int]], list[int]] | None = None,
        **kwargs,
    ):
        self.sample = sample
        self.keys = sorted(state)
        self.trainable = sorted(trainable)
        self.state = {k: state[k].clone() for k in self.keys}
        self.codec = codec or SharedRandK(1.0)
        self.seed_of = seed_of
        self.on_aggregate = on_aggregate
        self.last_round: dict[str, Any] = {}
        super().__init__(initial_parameters=ndarrays_to_parameters(self.ndarrays()), **kwargs)

    def ndarrays(self) -> list[np.ndarray]:
        return [flatten(self.state)]

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
        if len(mean) != 1:
            raise FedtuneError(f"SecAgg+ returned {len(mean)} arrays, expected one vector")
        layout = {k: tuple(self.state[k].shape) for k in self.trainable}
        delta = self.codec.decode(mean[0], layout, seed=self.seed_of(server_round))
        before = {k: v.clone() for k, v in self.state.items()}
        for k in self.trainable:
            self.state[k] = self.state[k] + delta[k]
        if self.on_aggregate is not None:
            self.on_aggregate(server_round, before, delta)
        return ndarrays_to_parameters(self.ndarrays()), metrics


def _weighted_metrics(pairs: list[tuple[float, dict]]) -> dict[str, float]:
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


class SecAggWire:
    """The server's end of SecAgg+'s wire, around ``grid``: counts and unpacks.

    Every message the workflow sends and every reply it gets is measured
    (`fedtune.flower.records.wire_bytes`, the serialized records) per node and per
    SecAgg+ stage until `take`. A reply carrying masked vectors holds them packed
    at ``bits`` bits an entry (`handle_secagg_train`); they are checked (two
    vectors: the weight factor and ``values`` entries) and widened back to the
    int64 arrays Flower's workflow sums. A reply that fails the check becomes that
    node's error reply, so SecAgg+ treats it as dropped (and removes its masks)
    instead of the server failing on it. Each node that sent an error reply or no
    reply is recorded once, with the stage and reason (Flower's workflow lists
    some failures twice and without their node).
    """

    def __init__(self, grid: Grid, *, bits: int, values: int):
        self.grid, self.bits, self.values = grid, bits, values
        self.take()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def take(self) -> dict[str, Any]:
        """What happened since the last call: ``{"down": {node: bytes}, "up": {node: bytes}, "stages": {stage:
        {"down": bytes, "up": bytes}}, "rejected": [{"node", "reason"}]}``."""
        out = getattr(self, "traffic", None)
        self.traffic: dict[str, Any] = {"down": {}, "up": {}, "stages": {}, "rejected": []}
        return out

    def _reject(self, node: int, reason: str) -> None:
        if all(r["node"] != node for r in self.traffic["rejected"]):
            self.traffic["rejected"].append({"node": node, "reason": reason[:500]})

    def _count(self, direction: str, stage: str, node: int, n: int) -> None:
        t = self.traffic
        t[direction][node] = t[direction].get(node, 0) + n
        per = t["stages"].setdefault(stage, {"down": 0, "up": 0})
        per[direction] += n

    def send_and_receive(self, messages, *, timeout: float | None = None):
        messages = list(messages)
        stage = "other"
        for m in messages:
            configs = m.content.config_records.get(RECORD_KEY_CONFIGS)
            stage = str(configs.get(Key.STAGE, "other")) if configs is not None else "other"
            self._count("down", stage, m.metadata.dst_node_id, wire_bytes(m.content))
        replies = []
        for r in self.grid.send_and_receive(messages, timeout=timeout):
            node = r.metadata.src_node_id
            if r.has_content():
                self._count("up", stage, node, wire_bytes(r.content))
                r = self._widen(r)
            if r.has_error():
                self._reject(node, f"{stage}: {short_reason(r.error.reason)}")
            replies.append(r)
        for node in {m.metadata.dst_node_id for m in messages} - {r.metadata.src_node_id for r in replies}:
            self._reject(node, f"{stage}: no reply")
        return replies

    def _widen(self, reply: Message) -> Message:
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is None or Key.MASKED_PARAMETERS not in configs:
            return reply
        blobs = configs[Key.MASKED_PARAMETERS]
        try:
            if not isinstance(blobs, list) or len(blobs) != 2 or not all(isinstance(b, bytes) for b in blobs):
                raise PayloadError("expected two packed vectors (weight factor, values)")
            arrays = [unpack_residues(b, self.bits, count) for b, count in zip(blobs, (1, self.values))]
        except PayloadError as exc:
            reason = f"masked vector refused: {exc}"
            return Message(
                metadata=reply.metadata, error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
            )
        configs[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a) for a in arrays]
        return reply


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
    codec = masked_codec(cfg)
    _, trainable_layout = layouts(cfg)
    wire = SecAggWire(PromptGrid(grid), bits=residue_bits(agg.modulus_range), values=codec.size(trainable_layout))

    def evaluate(final: bool) -> dict[str, float]:
        adapters.set_state_(ws.model, strategy.state)
        return held_out_metrics(ws, cfg, final=final)

    t_round = [time.monotonic()]

    def end_round(rnd: int, _ndarrays, _config):  # Flower's evaluate_fn: after round 0 (start) and each round
        if rnd > 0:
            info = strategy.last_round or {"accepted": 0, "rejected": [], "clients": []}
            strategy.last_round = {}
            traffic = wire.take()  # what the four stages of this round sent and received, measured
            # weighted as the masked mean was (aggregation.weighting), as DeltaRounds' strategy does
            train = _weighted_metrics([(agg.client_weight(c["num-examples"]), c) for c in info["clients"]])
            record = round_record(
                rnd,
                info["accepted"] + len(traffic["rejected"]),
                info["accepted"],
                traffic["rejected"],
                train,
                traffic["up"],
                traffic["down"],
                info["clients"],
                bytes_by_stage=traffic["stages"],
                **privacy.end_round(info["clients"]),
            )
            runlog.end_round(record, t_round[0], evaluate)
        t_round[0] = time.monotonic()
        return None

    strategy = MeanDeltaFedAvg(
        state,
        trainable,
        codec=codec,
        seed_of=lambda rnd: round_seed(cfg, rnd),
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
    kept = (
        f", random-k {codec.size(trainable_layout):,} of {n_params:,} coordinates a round (round seed)"
        if cfg.compression.codec == "randk"
        else ""
    )
    runlog.start(
        f"model {cfg.model.name} ({ws.task}), adapter {cfg.adapter.method}: {n_params:,} trainable params, "
        f"secure aggregation SecAgg+ ({wire.bits}-bit masked entries{kept}); {fed.num_clients} clients, "
        f"{fed.rounds} rounds, {len(ws.test_data())} held-out examples",
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
            modulus_range=agg.modulus_range,
            timeout=fed.round_timeout,
        )
    )
    workflow(wire, legacy)
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
    "SecAggWire",
    "check_weight",
    "fit_config",
    "flatten",
    "handle_secagg_train",
    "layouts",
    "masked_codec",
    "run_secagg",
    "secagg_weight",
    "train_delta",
    "unflatten",
]
