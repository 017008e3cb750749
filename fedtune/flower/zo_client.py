"""The ClientApp's train handler in zeroth-order mode (FedKSeed): seeds and scalars, no tensors.

FedKSeed: Qin et al. 2024, "Federated Full-Parameter Tuning of Billion-Sized Language
Models with Communication Cost under 18 Kilobytes", arXiv:2312.06353; local steps are
MeZO's (Malladi et al. 2023, arXiv:2305.17333). The math lives in `fedtune.zo`; this
module only moves it through Flower records.

A round, seen from the client:

1. The server sends ``config`` (``server-round``) and ``zo`` (``downlink``: the rounds
   of the seed history this node has not seen, `fedtune.zo.encode_downlink`). There
   is no ArrayRecord in either direction.
2. The client rebuilds the global model at round ``server-round - 1``: from its cached
   tuned parameters at its last known round (adapter scope, kept in ``context.state``)
   or else from the initial model, then `fedtune.zo.replay_` of the missing rounds.
   Replay is bit-exact, so every replica holds the same bits.
3. It takes ``zo.local_steps`` MeZO steps (model in ``eval()``: no dropout, so both
   losses of a step see the same function), one fixed mini-batch per step, seed
   indices drawn by `fedtune.zo.make_sampler` (uniform, or FedKSeed-Pro from the
   history) from a generator seeded by (train.seed, round, partition).
4. It replies with ``zo`` (``uplink``: the (seed index, scalar) pairs,
   `fedtune.zo.encode_uplink`) and ``metrics`` (num-examples, train_loss). The local
   model is discarded: next round it is rebuilt from the history.

Per-node ``context.state``: ``fedtune.zo`` (ConfigRecord: ``round``, ``history`` =
`fedtune.zo.encode_history` bytes) and, for ``scope = "adapter"``, ``fedtune.zo.params``
(ArrayRecord: the tuned parameters at that round, float32). With ``scope = "full"``
the whole model would not fit in per-node state, so the client replays from the
initial model every round (cost grows with the history; see `replay_`).

The initial model: what every party agrees on is the workspace's model as built
(base weights and adapter both come from fixed seeds, `fedtune.models`,
`fedtune.adapters.wrap`). `initial_params` loads the adapter from
`Workspace.initial_state` (snapshotted at build) and takes the base weights as they
are the first time this process tunes the model in zeroth-order mode; only
``scope = "full"`` ever moves base weights, and its snapshot is kept. With
``adapter.head_init = "prototypes"`` the initial model also has the prototype head,
which the server sends once, in the ``zo`` record's ``head`` (`fedtune.flower.prototypes`);
the node keeps it in ``context.state`` (``fedtune.zo.head``) and installs it whenever it
starts from the initial model (`start_params_`).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedtune import adapters, workspace
from fedtune.config import FedtuneConfig
from fedtune.data import collate
from fedtune.delta import Delta
from fedtune.env import setup_environment
from fedtune.errors import PayloadError
from fedtune.flower import protocol as P
from fedtune.flower.client import local_data
from fedtune.seeds import derive_seed
from fedtune.train import autocast, batch_loss, batch_stream, logit_adjustment_bias
from fedtune.zo import (
    SeedHistory,
    decode_downlink,
    decode_history,
    encode_history,
    encode_uplink,
    make_sampler,
    replay_,
    select_params,
    train_round_,
)
from fedtune.zo.estimator import LossFn

PARAMS_STATE = "fedtune.zo.params"
DOWNLINK_KEY = "downlink"
UPLINK_KEY = "uplink"
HEAD_KEY = "head"


# model -> (scope, tuned parameters as first seen, on the CPU)
_INITIAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def initial_params(ws: workspace.Workspace, scope: str) -> Delta:
    """The tuned parameters of the initial model (shared, read-only; CPU, original dtype).

    Snapshotted on first use per model (leaving the model's adapter at its initial
    state); asking for another scope later raises, because with ``"full"`` the base
    weights may have moved since.
    """
    held = _INITIAL.get(ws.model)
    if held is None:
        adapters.set_state_(ws.model, ws.initial_state())  # the adapter may hold a later state
        snap = {n: p.detach().to("cpu", copy=True) for n, p in select_params(ws.model, scope)}
        _INITIAL[ws.model] = held = (scope, snap)
    if held[0] != scope:
        raise RuntimeError(
            f"this process already tuned the model with zo.scope = {held[0]!r}; "
            f"a run with scope {scope!r} needs a fresh process (the initial model is gone)"
        )
    return held[1]


def read_params(ws: workspace.Workspace, scope: str) -> Delta:
    """A CPU copy of the model's tuned parameters (original dtype)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in select_params(ws.model, scope)}


@torch.no_grad()
def load_params_(ws: workspace.Workspace, scope: str, values: Mapping[str, torch.Tensor]) -> list:
    """Copy ``values`` into the model's tuned parameters (exact); returns them as (name, param)."""
    params = select_params(ws.model, scope)
    names = [n for n, _ in params]
    if sorted(values) != names:
        missing, extra = sorted(set(names) - set(values)), sorted(set(values) - set(names))
        raise KeyError(f"tuned parameters do not match the model: missing {missing[:3]}, unknown {extra[:3]}")
    for n, p in params:
        p.copy_(values[n].to(device=p.device, dtype=p.dtype))
    return params


def merge_downlink(held: SeedHistory, first_round: int, entries: Sequence) -> tuple[SeedHistory, int]:
    """The server's history from what this client holds and a downlink starting at ``first_round``.

    Returns ``(history, valid)``: ``valid`` is how many of the held rounds agree with the
    server's (a model cached at round ``r <= valid`` can be replayed forward). A
    downlink from round 1 is the whole truth and replaces whatever the client holds;
    one that starts past the client's last round + 1 is a gap (`PayloadError`).
    """
    if first_round > len(held) + 1:
        raise PayloadError(
            f"downlink starts at round {first_round} but this client holds rounds 1..{len(held)} "
            "(its state was lost); the server must resend the whole history"
        )
    combined = list(held.entries[: first_round - 1]) + list(entries)
    valid = first_round - 1
    for r in range(first_round, min(len(held), len(combined)) + 1):
        if held.entry(r) != combined[r - 1]:
            break
        valid = r
    return SeedHistory(held.pool, combined), valid


def batch_loss_fns(
    ws: workspace.Workspace,
    data: list[dict],
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    losses: list[float],
    *,
    logit_adjustment: float = 0.0,
    mixed_precision: str = "no",
) -> list[LossFn]:
    """One loss function per step, each on its own fixed mini-batch; every call logs its loss.

    The model's own loss (cross-entropy on the labels the batch carries, for
    classification and causal LM alike); call it with the model in ``eval()``. The
    forward pass runs under ``train.mixed_precision`` as gradient training's does (bf16
    autocast: about 6x faster SmolLM2 forward passes on this CPU); the loss itself is
    float32, so the two-point difference is taken in float32.
    For classification with ``logit_adjustment`` > 0, the cross-entropy of
    ``logits + logit_adjustment * log p_local(y)`` (`fedtune.train.logit_adjustment_bias`),
    as gradient training does: without it a silo holding one label fits that label's prior.
    """
    stream = batch_stream(data, batch_size, generator)
    model, device = ws.model, ws.device
    adjust = logit_adjustment_bias(model, data, logit_adjustment, ws.task, device)

    def make(batch: dict[str, torch.Tensor]) -> LossFn:
        def loss() -> float:
            with autocast(device, mixed_precision):
                value = float(batch_loss(model, batch, adjust))
            losses.append(value)
            return value

        return loss

    return [make({k: v.to(device) for k, v in collate(next(stream), ws.pad_id, ws.task).items()}) for _ in range(steps)]


def step_generators(cfg: FedtuneConfig, rnd: int, pid: int) -> tuple[torch.Generator, torch.Generator]:
    """(seed sampling, batch order) generators, from (train.seed, round, partition)."""
    seeds = (derive_seed(what, cfg.train.seed, rnd, pid) for what in ("zo-seed-indices", "zo-batches"))
    return tuple(torch.Generator().manual_seed(s) for s in seeds)  # type: ignore[return-value]


def local_round_(
    ws: workspace.Workspace, data: list[dict], cfg: FedtuneConfig, history: SeedHistory, rnd: int, pid: int
) -> tuple[list[tuple[int, float]], float]:
    """``zo.local_steps`` MeZO steps on the model as it is; returns (pairs, mean train loss)."""
    zo = cfg.zo
    seed_gen, batch_gen = step_generators(cfg, rnd, pid)
    losses: list[float] = []
    adjust, precision = cfg.train.logit_adjustment, cfg.train.mixed_precision
    fns = batch_loss_fns(
        ws,
        data,
        zo.local_steps,
        cfg.train.batch_size,
        batch_gen,
        losses,
        logit_adjustment=adjust,
        mixed_precision=precision,
    )
    ws.model.eval()
    pairs = train_round_(
        select_params(ws.model, zo.scope),
        fns,
        make_sampler(zo, history),
        seed_gen,
        history.pool,
        zo.eps,
        zo.lr,
        zo.grad_clip,
    )
    return pairs, (float(np.mean(losses)) if losses else math.nan)


def _held_state(context: Context, pool) -> tuple[SeedHistory, int]:
    if P.ZO_STATE not in context.state:
        return SeedHistory(pool), -1
    rec = context.state[P.ZO_STATE]
    history = decode_history(bytes(rec["history"]), pool)
    cached = int(rec["round"]) if PARAMS_STATE in context.state else -1
    return history, cached if cached == len(history) else -1


def start_params_(ws: workspace.Workspace, context: Context, cfg: FedtuneConfig) -> None:
    """Load the initial model's tuned parameters: the built ones, with the prototype head the server
    sent this node (``adapter.head_init = "prototypes"``) in place of the random head."""
    scope = cfg.zo.scope
    load_params_(ws, scope, initial_params(ws, scope))
    if cfg.adapter.head_init != "prototypes":
        return
    if P.ZO_HEAD not in context.state:
        raise PayloadError(
            "adapter.head_init is 'prototypes' but this node holds no prototype head; the server resends it"
        )
    from fedtune.flower.prototypes import head_from_payload

    adapters.set_state_(ws.model, head_from_payload(ws.model, bytes(context.state[P.ZO_HEAD][HEAD_KEY])))


def sync_model_(
    ws: workspace.Workspace, context: Context, cfg: FedtuneConfig, downlink: bytes, head: bytes | None = None
) -> SeedHistory:
    """Bring ``ws.model`` to the server's latest round; update and return the node's history.

    ``head``: the prototype head, when the server sends it (kept for every later start from
    the initial model)."""
    scope, pool = cfg.zo.scope, cfg.zo.pool()
    initial_params(ws, scope)  # snapshot the initial model before anything below moves it
    if head is not None:
        context.state[P.ZO_HEAD] = ConfigRecord({HEAD_KEY: head})
    held, cached = _held_state(context, pool)
    first, entries = decode_downlink(downlink, pool)
    history, valid = merge_downlink(held, first, entries)
    if 0 <= cached <= valid:
        stored = context.state[PARAMS_STATE]
        start = cached
        load_params_(ws, scope, {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in stored.items()})
    else:
        start = 0
        start_params_(ws, context, cfg)
    replay_(select_params(ws.model, scope), history, start, lr=cfg.zo.lr)
    context.state[P.ZO_STATE] = ConfigRecord({"round": len(history), "history": encode_history(history)})
    if scope == "adapter":
        # float32 on the wire of the state store; a cast back to the parameter dtype is exact
        snap = {n: p.detach().to("cpu", torch.float32) for n, p in select_params(ws.model, scope)}
        context.state[PARAMS_STATE] = ArrayRecord(torch_state_dict=snap)
    return history


def handle_train_zo(msg: Message, context: Context, cfg: FedtuneConfig) -> Message:
    """FedKSeed client round: replay the downlink, take local ZO steps, send the pairs."""
    setup_environment()
    torch.set_num_threads(cfg.simulation.threads_per_client)
    ws = workspace.get(cfg)
    pid, data = local_data(ws, context, cfg)
    rnd = int(msg.content[P.CONFIG]["server-round"])
    zo_record = msg.content[P.ZO]
    head = bytes(zo_record[HEAD_KEY]) if HEAD_KEY in zo_record else None
    history = sync_model_(ws, context, cfg, bytes(zo_record[DOWNLINK_KEY]), head)
    if len(history) != rnd - 1:
        raise PayloadError(f"server round {rnd} needs rounds 1..{rnd - 1}, the downlink gives 1..{len(history)}")
    pairs, train_loss = local_round_(ws, data, cfg, history, rnd, pid)
    reply = RecordDict(
        {
            P.ZO: ConfigRecord({UPLINK_KEY: encode_uplink(pairs, history.pool)}),
            P.METRICS: MetricRecord({"num-examples": len(data), "train_loss": train_loss}),
        }
    )
    return Message(reply, reply_to=msg)


__all__ = [
    "handle_train_zo",
    "initial_params",
    "start_params_",
    "load_params_",
    "read_params",
    "local_round_",
    "merge_downlink",
]
