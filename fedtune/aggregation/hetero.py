"""Heterogeneous LoRA ranks: clients train at their own rank, the server aggregates in product space.

FlexLoRA (Bai et al. 2024, arXiv:2402.11505): every client sends factors of
its own rank r_i; the server averages the effective updates ``s_i B_i A_i``
(weighted by examples) into one dense update per layer and hands each client
the truncated SVD at its rank. HetLoRA (Cho et al. 2024, arXiv:2401.06432)
shares the idea of one global adapter cut to each client's rank.

Plain FlexLoRA recomputes the global from the clients' states alone, so the
part of the global a rank-r_i client could not hold (``G - T_{r_i}(G)``) is
pulled toward zero every round. `hetero_update` instead averages what each
client *changed*: ``G + sum_i w_i (D_i - T_{r_i}(G))``. When every client holds
the full global (r_i >= rank G) both coincide.

In the federated loop (`hetero_round`) the global is held as factors at a fixed
rank R >= every r_i, so a checkpoint of those factors is the whole server state,
and client i starts from ``cut_to_rank(global, r_i)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedtune.aggregation.lora import (
    AggregationReport,
    LayerReport,
    ScalingSpec,
    Svd,
    _dense_key,
    _dense_layers,
    _dense_svd,
    _factors,
    _numerical_rank,
    _plain_mean,
    _scaling,
    _svd_of_product,
    _weights,
    factors_for_rank,
    lora_layers,
    refactor,
)
from fedtune.delta import Delta
from fedtune.errors import ConfigError, PayloadError


def hetero_update(
    global_dense: Delta | None,
    states: Sequence[Delta],
    weights: Sequence[float],
    scaling: ScalingSpec,
    *,
    max_rank: int | None = None,
) -> Delta:
    """New dense global from clients of mixed ranks: ``G + sum_i w_i (s_i B_i A_i - T_{r_i}(G))``.

    ``global_dense`` is the dense state (see `fedtune.aggregation.lora.dense_mean`)
    the clients' factors were cut from with `factors_for_rank`; ``None`` in the
    first round, or to get plain FlexLoRA ``sum_i w_i s_i B_i A_i``. Non-LoRA
    keys are averaged plainly either way. ``max_rank`` truncates the result
    (the "global at max rank" variant); ``None`` keeps it exact.
    """
    svds = None if global_dense is None else _state_svds(global_dense, scaling)
    return _hetero_step(svds, states, weights, scaling, max_rank)[0]


def cut_to_rank(state: Delta, rank: int, scaling: ScalingSpec) -> Delta:
    """The factors a rank-``rank`` client starts from: ``state`` itself when its LoRA layers are
    at ``rank`` already, else their truncated SVD at ``rank`` (`factors_for_rank`).

    Server and client both call this on the same global, so a client that was
    sent the global at a higher rank cuts it itself and the server knows what it
    started from without being told.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank must be a positive int, got {rank!r}")
    held = {state[a].shape[0] for a, _ in lora_layers(state).values()}
    if held <= {rank}:
        return {k: v.detach().clone() for k, v in state.items()}
    return factors_for_rank(state, rank, scaling)


def hetero_round(
    global_state: Delta,
    states: Sequence[Delta],
    weights: Sequence[float],
    scaling: ScalingSpec,
    rank: int,
) -> tuple[Delta, AggregationReport]:
    """One server round of heterogeneous ranks on a global held as rank-``rank`` factors.

    `hetero_update` from ``global_state`` (client i started from
    ``cut_to_rank(global_state, r_i)`` and sends its trained factors, r_i <=
    ``rank``), truncated to ``rank`` and re-factored with A aligned to
    ``global_state``'s (directions the update leaves empty keep its A rows, with
    a zero B). The report's residual is what the cut to ``rank`` drops.
    """
    svds = _state_svds(global_state, scaling)
    dense, new_svds, parts = _hetero_step(svds, states, weights, scaling, rank)
    out, _ = refactor(dense, rank, scaling, reference=global_state, svds=new_svds)
    return out, AggregationReport.from_parts(parts)


def _state_svds(state: Delta, scaling: ScalingSpec) -> dict[str, Svd]:
    """Thin SVD of each LoRA layer of a dense or factor state, cut at its numerical rank."""
    out = {}
    for prefix, (key, _, _) in _dense_layers(state).items():
        out[prefix] = _dense_svd(state[key])
    for prefix, (a_key, b_key) in lora_layers(k for k in state if not _dense_layers([k])).items():
        a2, b2, _ = _factors(state, a_key, b_key, "global state")
        out[prefix] = _svd_of_product(b2 * _scaling(scaling, prefix, a2.shape[0]), a2)
    cut = {}
    for prefix, (u, s, vh) in out.items():
        k = _numerical_rank(s, u.shape[0], vh.shape[1])
        cut[prefix] = (u[:, :k], s[:k], vh[:k])
    return cut


def _hetero_step(
    global_svds: Mapping[str, Svd] | None,
    states: Sequence[Delta],
    weights: Sequence[float],
    scaling: ScalingSpec,
    max_rank: int | None,
) -> tuple[Delta, dict[str, Svd], dict[str, tuple[LayerReport, float, float]]]:
    """`hetero_update` on a factored global: every term is low-rank, so one QR + small SVD per layer.

    ``sum_i w_i T_{r_i}(G) = U diag(c * S) V^T`` with ``c_j = sum of w_i over
    clients with r_i > j``, so ``G - that = U diag((1 - c) S) V^T``.
    """
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise ConfigError(f"max_rank must be a positive int or None, got {max_rank!r}")
    w = _weights(weights, len(states))
    for i, st in enumerate(states[1:], start=1):
        if set(st) != set(states[0]):
            raise PayloadError(f"client {i} has different keys than client 0")
    layers = lora_layers(states[0])
    if global_svds is not None and set(global_svds) != set(layers):
        missing = sorted(set(global_svds) - set(layers))[:3]
        extra = sorted(set(layers) - set(global_svds))[:3]
        raise PayloadError(f"client LoRA layers do not match the global (missing {missing}, extra {extra})")
    a_keys = {a: p for p, (a, _) in layers.items()}
    b_keys = {b for _, b in layers.values()}
    out: Delta = {}
    svds: dict[str, Svd] = {}
    parts: dict[str, tuple[LayerReport, float, float]] = {}
    for key in states[0]:
        if key in b_keys:
            continue
        if key not in a_keys:
            out[key] = _plain_mean(states, w, key)
            continue
        prefix = a_keys[key]
        a_key, b_key = layers[prefix]
        bs, as_, shape = [], [], None
        for i, (st, wi) in enumerate(zip(states, w)):
            a2, b2, dense_shape = _factors(st, a_key, b_key, f"client {i}")
            if shape is not None and dense_shape != shape:
                raise PayloadError(
                    f"client {i}: layer {prefix!r} has effective shape {dense_shape}, client 0 has {shape}"
                )
            shape = dense_shape
            bs.append(b2 * (wi * _scaling(scaling, prefix, a2.shape[0])))
            as_.append(a2)
        if global_svds is not None:
            u, s, vh = global_svds[prefix]
            if u.shape[0] != shape[0] or vh.shape[1] != as_[0].shape[1]:
                raise PayloadError(f"layer {prefix!r}: clients' effective shape {shape} does not match the global")
            c = torch.zeros_like(s)
            for a2, wi in zip(as_, w):
                c[: a2.shape[0]] += wi
            bs.insert(0, u * (s * (1.0 - c)).clamp(min=0.0))
            as_.insert(0, vh)
        u, s, vh = _svd_of_product(torch.cat(bs, dim=1), torch.cat(as_))
        numerical = _numerical_rank(s, u.shape[0], vh.shape[1])
        k = numerical if max_rank is None else min(numerical, max_rank)
        dropped, total = float(s[k:].square().sum()), float(s.square().sum())
        svds[prefix] = (u[:, :k], s[:k], vh[:k])
        out[_dense_key(a_key)] = ((u[:, :k] * s[:k]) @ vh[:k]).reshape(shape).to(states[0][a_key].dtype)
        residual = (dropped / total) ** 0.5 if total > 0 else 0.0
        parts[prefix] = (LayerReport(rank=k, numerical_rank=numerical, residual=residual), dropped, total)
    return out, svds, parts
