"""LoRA-aware averaging of peft adapter states.

A LoRA layer contributes ``scaling * B @ A`` to its base weight (Hu et al.
2021, arXiv:2106.09685), with ``scaling = lora_alpha / r`` or, with rsLoRA,
``lora_alpha / sqrt(r)`` (Kalajdzievski 2023, arXiv:2312.03732). FedAvg of the
effective weights is the weighted mean of those products, which is *not* the
product of the mean factors. This module offers the three ways out:

- `naive_mean`: average A and B key by key (FedIT, Zhang et al. 2024,
  arXiv:2305.05644). Biased; its report measures the bias.
- `ffa_mean`: A frozen and shared, average B only (FFA-LoRA, Sun et al. 2024,
  arXiv:2403.12313). Exact.
- `product_space_mean`: average the products and re-factor them with a
  truncated SVD (FedEx-LoRA, Singhal et al. 2024, arXiv:2410.09432, keeps the
  residual in the base weight; here it is reported instead). Exact whenever the
  mean has rank <= the output rank; ``rank="lossless"`` guarantees it.

`dense_mean`, `to_dense` and `factors_for_rank` are the pieces behind
heterogeneous ranks (see `fedtune.aggregation.hetero`).

States are ``dict[str, Tensor]`` as ``peft.get_peft_model_state_dict`` returns
them: ``<prefix>.lora_A.weight`` (r x in, or r x in x k x k for convolutions)
with ``<prefix>.lora_B.weight`` (out x r [x 1 x 1]), and for embeddings
``<prefix>.lora_embedding_A`` (r x num_embeddings) with
``<prefix>.lora_embedding_B`` (dim x r). Every other key (classifier head, DoRA
``lora_magnitude_vector``, ``prompt_embeddings``, ``lora_B.bias``) is averaged
plainly. A *dense* state replaces each pair by one key, ``<prefix>.lora_BA.weight``
or ``<prefix>.lora_embedding_BA``, holding ``scaling * B @ A`` reshaped to
``(out, *A.shape[1:])`` (the ``B @ A`` orientation, which for embeddings is the
transpose of peft's ``get_delta_weight``).

All maths runs in float64; results are cast back to the clients' dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType

import torch

from fedtune.delta import Delta
from fedtune.errors import ConfigError, PayloadError

ScalingSpec = float | Mapping[str, float] | Callable[[str, int], float]
RankSpec = int | Mapping[str, int]
Svd = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# (A suffix, B suffix, dense suffix)
_PAIRS = (
    (".lora_A.weight", ".lora_B.weight", ".lora_BA.weight"),
    (".lora_embedding_A", ".lora_embedding_B", ".lora_embedding_BA"),
)
_F64 = torch.float64
# peft initialises lora_A with kaiming_uniform_(a=sqrt(5)): entries U(-1/sqrt(in), 1/sqrt(in)),
# so each row has norm about 1/sqrt(3) whatever `in` is.
_INIT_ROW_NORM = 1.0 / math.sqrt(3.0)


@dataclasses.dataclass(frozen=True)
class LoraScaling:
    """peft's LoRA scaling as a function of a layer's rank: ``(prefix, rank) -> float``.

    ``lora_alpha / rank``, or ``lora_alpha / sqrt(rank)`` with rsLoRA
    (Kalajdzievski 2023, arXiv:2312.03732). Because the rank is read from each
    state's shapes, peft's ``rank_pattern`` is handled; ``alpha_pattern`` is not.
    """

    lora_alpha: float
    use_rslora: bool = False

    def __post_init__(self) -> None:
        a = self.lora_alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
            raise ConfigError(f"lora_alpha must be a finite number > 0, got {a!r}")
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"use_rslora must be a bool, got {self.use_rslora!r}")

    def __call__(self, prefix: str, rank: int) -> float:
        return self.lora_alpha / (math.sqrt(rank) if self.use_rslora else rank)

    @classmethod
    def from_peft_config(cls, config: object) -> LoraScaling:
        """From a ``peft.LoraConfig`` (read by attribute; peft is not imported)."""
        if getattr(config, "alpha_pattern", None):
            raise ConfigError("alpha_pattern is not supported by LoraScaling; pass a dict or callable scaling instead")
        return cls(lora_alpha=config.lora_alpha, use_rslora=bool(getattr(config, "use_rslora", False)))  # type: ignore[attr-defined]


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """What re-factoring did to one LoRA layer.

    Attributes:
        rank: rank of the returned factors.
        numerical_rank: rank of the exact weighted mean of the products.
        residual: ``||returned - exact|| / ||exact||`` (Frobenius, 0 when exact
            is 0): the truncation error in product space, or for naive
            averaging its bias.
        filled: directions beyond the numerical rank, given a zero B column
            and a non-zero A row so they stay trainable.
    """

    rank: int
    numerical_rank: int
    residual: float
    filled: int = 0


@dataclasses.dataclass(frozen=True)
class AggregationReport:
    """Per-layer reports and the relative residual over all layers taken together."""

    layers: Mapping[str, LayerReport]
    total_residual: float

    @staticmethod
    def from_parts(parts: Mapping[str, tuple[LayerReport, float, float]]) -> AggregationReport:
        """From ``{prefix: (report, dropped_sq, total_sq)}``."""
        dropped = sum(p[1] for p in parts.values())
        total = sum(p[2] for p in parts.values())
        return AggregationReport(
            layers=MappingProxyType({k: p[0] for k, p in parts.items()}),
            total_residual=math.sqrt(dropped / total) if total > 0 else 0.0,
        )


# --------------------------------------------------------------------------- keys


def lora_layers(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Group LoRA factor keys by layer: ``{prefix: (a_key, b_key)}``, in key order.

    Raises:
        PayloadError: an A factor without its B (or the reverse).
    """
    keys = list(keys)
    present = set(keys)
    out: dict[str, tuple[str, str]] = {}
    for key in keys:
        for a_sfx, b_sfx, _ in _PAIRS:
            for own, other, is_a in ((a_sfx, b_sfx, True), (b_sfx, a_sfx, False)):
                if key.endswith(own):
                    prefix = key[: -len(own)]
                    partner = prefix + other
                    if partner not in present:
                        raise PayloadError(f"{key!r} has no matching {partner!r}")
                    if prefix not in out:
                        out[prefix] = (key, partner) if is_a else (partner, key)
    return out


def _dense_layers(keys: Iterable[str]) -> dict[str, tuple[str, str, str]]:
    """``{prefix: (dense_key, a_key, b_key)}`` for the dense keys among ``keys``."""
    out = {}
    for key in keys:
        for a_sfx, b_sfx, d_sfx in _PAIRS:
            if key.endswith(d_sfx):
                prefix = key[: -len(d_sfx)]
                out[prefix] = (key, prefix + a_sfx, prefix + b_sfx)
    return out


def _dense_key(a_key: str) -> str:
    for a_sfx, _, d_sfx in _PAIRS:
        if a_key.endswith(a_sfx):
            return a_key[: -len(a_sfx)] + d_sfx
    raise AssertionError(a_key)


# --------------------------------------------------------------------------- helpers


def _weights(weights: Sequence[float], n: int) -> list[float]:
    if n == 0:
        raise PayloadError("no client states to aggregate")
    if len(weights) != n:
        raise PayloadError(f"got {n} states but {len(weights)} weights")
    ws = []
    for i, w in enumerate(weights):
        w = float(w)
        if not math.isfinite(w) or w < 0:
            raise PayloadError(f"weight of client {i} must be finite and >= 0, got {w!r}")
        ws.append(w)
    total = sum(ws)
    if total <= 0:
        raise PayloadError(f"weights must sum to a positive number, got {total}")
    return [w / total for w in ws]


def _check_same_keys(states: Sequence[Delta]) -> None:
    first = list(states[0])
    for i, st in enumerate(states[1:], start=1):
        if st.keys() != states[0].keys():
            missing = sorted(set(first) - set(st))[:3]
            extra = sorted(set(st) - set(first))[:3]
            raise PayloadError(f"client {i} has different keys than client 0 (missing {missing}, extra {extra})")


def _plain_mean(states: Sequence[Delta], w: Sequence[float], key: str) -> torch.Tensor:
    ref = states[0][key]
    acc = torch.zeros(ref.shape, dtype=_F64)
    for i, (st, wi) in enumerate(zip(states, w)):
        v = st[key]
        if v.shape != ref.shape:
            raise PayloadError(
                f"client {i} sends {key!r} with shape {tuple(v.shape)}, client 0 with {tuple(ref.shape)}"
            )
        acc += v.detach().to(_F64) * wi
    return acc.to(ref.dtype)


def _scaling(spec: ScalingSpec, prefix: str, rank: int) -> float:
    if isinstance(spec, Mapping):
        if prefix not in spec:
            raise ConfigError(f"scaling has no entry for LoRA layer {prefix!r}")
        s = spec[prefix]
    elif callable(spec):
        s = spec(prefix, rank)
    else:
        s = spec
    s = float(s)
    if not math.isfinite(s) or s <= 0:
        raise ConfigError(f"scaling for {prefix!r} at rank {rank} must be finite and > 0, got {s!r}")
    return s


def _target_rank(rank: RankSpec | str | None, prefix: str, client_ranks: Sequence[int], max_rank: int) -> int:
    if rank is None:
        return max(client_ranks)
    if rank == "lossless":
        return max(1, min(sum(client_ranks), max_rank))
    if isinstance(rank, Mapping) and prefix not in rank:
        raise ConfigError(f"rank has no entry for LoRA layer {prefix!r}")
    r = rank[prefix] if isinstance(rank, Mapping) else rank
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"rank for {prefix!r} must be a positive int, got {r!r}")
    return r


def _factors(state: Delta, a_key: str, b_key: str, who: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """2-D float64 views ``(A: r x in, B: out x r)`` and the dense shape ``(out, *A.shape[1:])``."""
    a, b = state[a_key], state[b_key]
    if a.ndim < 2 or b.ndim < 2:
        raise PayloadError(
            f"{who}: {a_key!r} and {b_key!r} must have >= 2 dims, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    r = a.shape[0]
    if b.shape[1] != r or any(d != 1 for d in b.shape[2:]) or b.ndim != a.ndim:
        raise PayloadError(
            f"{who}: {b_key!r} has shape {tuple(b.shape)}, which does not match {a_key!r} of shape {tuple(a.shape)}"
        )
    dense_shape = (b.shape[0], *a.shape[1:])
    return a.detach().reshape(r, -1).to(_F64), b.detach().reshape(b.shape[0], r).to(_F64), dense_shape


def _unflatten(
    b2: torch.Tensor, a2: torch.Tensor, dense_shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    r = a2.shape[0]
    a = a2.reshape(r, *dense_shape[1:]).to(dtype)
    b = b2.reshape(dense_shape[0], r, *([1] * (len(dense_shape) - 2))).to(dtype)
    return a, b


def _ref_rows(reference: Delta | None, a_key: str, in_dim: int) -> torch.Tensor | None:
    if reference is None:
        return None
    if a_key not in reference:
        raise ValueError(f"reference state has no {a_key!r}")
    ref = reference[a_key].detach()
    ref2 = ref.reshape(ref.shape[0], -1).to(_F64)
    if ref2.shape[1] != in_dim:
        raise ValueError(f"reference {a_key!r} has shape {tuple(ref.shape)}, which does not fit input size {in_dim}")
    return ref2


# --------------------------------------------------------------------------- SVD re-factoring


def _svd_of_product(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``b @ a`` without forming it: QR of both factors, SVD of the small core.

    Costs O((out + in) R^2) for inner size R instead of O(out * in * min(out, in)).
    """
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.mT)
    uc, s, vhc = torch.linalg.svd(rb @ ra.mT, full_matrices=False)
    return qb @ uc, s, vhc @ qa.mT


def _numerical_rank(s: torch.Tensor, rows: int, cols: int) -> int:
    """Singular values above matrix_rank's tolerance, floored at 1e-12 relative:
    the QR/SVD of a sum of products leaves ~1e-15 dust."""
    if not s.numel() or float(s[0]) <= 0:
        return 0
    tol = float(s[0]) * max(max(rows, cols) * torch.finfo(_F64).eps, 1e-12)
    return int((s > tol).sum())


def _complement_rows(cands: torch.Tensor | None, live: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` rows orthogonal to the rows of ``live`` (orthonormal), for directions the mean left empty.

    Taken first from the part of ``cands`` (incoming A rows) outside span(live),
    keeping their scale; then from standard basis vectors, at peft's init scale.
    """
    dim = live.shape[1]
    rows: list[torch.Tensor] = []
    basis = live
    scale = _INIT_ROW_NORM
    if cands is not None and cands.numel() and float(cands.abs().max()) > 0:
        norms = cands.norm(dim=1)
        scale = float(norms[norms > 0].mean())
        proj = cands - (cands @ basis.mT) @ basis if basis.numel() else cands
        _, sp, vp = torch.linalg.svd(proj, full_matrices=False)
        cutoff = 1e-6 * float(torch.linalg.matrix_norm(cands, ord=2))
        take = [j for j in range(min(n, sp.numel())) if float(sp[j]) > cutoff]
        if take:
            rows.extend(sp[take, None] * vp[take])
            basis = torch.cat([basis, vp[take]])
    while len(rows) < n:
        # ||e_i - proj(e_i)||^2 = 1 - sum_q q_i^2 for orthonormal rows q
        resid = 1.0 - basis.square().sum(0) if basis.numel() else torch.ones(dim, dtype=_F64)
        i = int(resid.argmax())
        if float(resid[i]) <= 1e-9:
            break
        v = -basis.mT @ basis[:, i] if basis.numel() else torch.zeros(dim, dtype=_F64)
        v[i] += 1.0
        v = v / v.norm()
        basis = torch.cat([basis, v[None]])
        rows.append(v * scale)
    while len(rows) < n:  # more rows than dimensions: nothing orthogonal is left
        rows.append(torch.zeros(dim, dtype=_F64))
    return torch.stack(rows) if rows else torch.zeros(0, dim, dtype=_F64)


def _factorize(
    u: torch.Tensor,
    s: torch.Tensor,
    vh: torch.Tensor,
    rank: int,
    scale_out: float,
    *,
    cands: torch.Tensor | None,
    ref_a: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, LayerReport, float, float]:
    """Rank-``rank`` factors with ``scale_out * B @ A`` = the truncated ``u diag(s) vh``.

    Singular vector signs are fixed so the result is deterministic. Without a
    reference of the output shape the split is balanced, ``B = U sqrt(S)``,
    ``A = sqrt(S) V^T`` (divided by ``sqrt(scale_out)``). Directions past the
    numerical rank get A rows from ``cands`` and zero B columns: the product is
    unchanged, but both factors zero would leave the direction with zero
    gradient for ever (the degenerate all-``B = 0`` case).

    With ``ref_a`` of the output shape (the A the clients trained from), the
    split keeps LoRA's division of labour instead: A holds orthogonal
    directions, every row at the reference's RMS row norm ``c``, and B the
    magnitudes. From orthonormal rows ``Q0`` (``V^T``, then the filled
    directions) and ``B0 = [U S / scale_out, 0]``, ``A = c R Q0`` and
    ``B = B0 R^T / c`` with ``R`` the rotation that brings A closest to
    ``ref_a`` (orthogonal Procrustes), so a
    server optimizer that differences factors round to round (FedAdam's
    ``aggregated - current``) sees a meaningful change rather than an SVD
    basis flip. A least-squares change of basis would match ``ref_a`` more
    closely but can be nearly singular when the mean's row space turns away
    from the reference, and the B it inflates trains badly (A's gradient is
    ``B^T dW``) although the product is exact.
    """
    total_sq = float(s.square().sum())
    numerical = _numerical_rank(s, u.shape[0], vh.shape[1])
    k = min(rank, numerical)
    dropped_sq = float(s[k:].square().sum())
    u, vh = u[:, :k].clone(), vh[:k].clone()
    if k:
        idx = u.abs().argmax(dim=0)
        signs = torch.sign(u[idx, torch.arange(k)])
        u, vh = u * signs, vh * signs[:, None]
    fill = rank - k
    align = ref_a is not None and tuple(ref_a.shape) == (rank, vh.shape[1]) and float(ref_a.abs().max()) > 0
    if align:
        b, a = u * (s[:k] / scale_out), vh
    else:
        root = s[:k].sqrt()
        b = u * (root / math.sqrt(scale_out))
        a = vh * (root / math.sqrt(scale_out))[:, None]
    if fill:
        extra = _complement_rows(ref_a if ref_a is not None else cands, vh, fill)
        if align:
            extra = extra / extra.norm(dim=1, keepdim=True)
        a = torch.cat([a, extra])
        b = torch.cat([b, torch.zeros(b.shape[0], fill, dtype=_F64)], dim=1)
    if align and k == 0:  # nothing moved: keep the reference's A as it is
        a = ref_a.clone()
    elif align:
        c = float(ref_a.square().sum(dim=1).mean().sqrt())
        ur, _, vhr = torch.linalg.svd(ref_a @ a.mT)
        rot = ur @ vhr
        a = c * (rot @ a)
        b = (b @ rot.mT) / c
    residual = math.sqrt(dropped_sq / total_sq) if total_sq > 0 else 0.0
    report = LayerReport(rank=rank, numerical_rank=numerical, residual=residual, filled=fill)
    return b, a, report, dropped_sq, total_sq


# --------------------------------------------------------------------------- aggregation


def naive_mean(states: Sequence[Delta], weights: Sequence[float]) -> tuple[Delta, AggregationReport]:
    """Average every key separately, A and B included (FedIT, arXiv:2305.05644).

    The report's residual is the bias ``||mean(B) mean(A) - mean(B A)|| / ||mean(B A)||``
    per layer (scaling cancels since all clients share it).
    """
    w = _weights(weights, len(states))
    _check_same_keys(states)
    out = {k: _plain_mean(states, w, k) for k in states[0]}
    parts = {}
    for prefix, (a_key, b_key) in lora_layers(states[0]).items():
        bs, as_ = [], []
        for i, (st, wi) in enumerate(zip(states, w)):
            a2, b2, _ = _factors(st, a_key, b_key, f"client {i}")
            bs.append(b2 * wi)
            as_.append(a2)
        a_mean, b_mean, _ = _factors(out, a_key, b_key, "mean")
        # both norms from factors (QR + small SVD), never the out x in matrix
        _, s_exact, _ = _svd_of_product(torch.cat(bs, dim=1), torch.cat(as_))
        _, s_diff, _ = _svd_of_product(torch.cat([b_mean, *(-b for b in bs)], dim=1), torch.cat([a_mean, *as_]))
        diff_sq, total_sq = float(s_diff.square().sum()), float(s_exact.square().sum())
        res = math.sqrt(diff_sq / total_sq) if total_sq > 0 else (0.0 if diff_sq == 0 else math.inf)
        parts[prefix] = (
            LayerReport(a_mean.shape[0], _numerical_rank(s_exact, b_mean.shape[0], a_mean.shape[1]), res),
            diff_sq,
            total_sq,
        )
    return out, AggregationReport.from_parts(parts)


def ffa_mean(
    states: Sequence[Delta],
    weights: Sequence[float],
    *,
    atol: float = 0.0,
    reference: Delta | None = None,
) -> tuple[Delta, AggregationReport]:
    """FFA-LoRA: A is frozen and shared, so averaging B alone is exact (Sun et al. 2024, arXiv:2403.12313).

    ``scaling * mean(B_i) @ A == mean(scaling * B_i @ A)``.

    Raises:
        PayloadError: a client's A differs from client 0's (or from
            ``reference``'s) by more than ``atol``.
    """
    w = _weights(weights, len(states))
    _check_same_keys(states)
    layers = lora_layers(states[0])
    for a_key, _ in layers.values():
        base = reference[a_key] if reference is not None else states[0][a_key]
        for i, st in enumerate(states):
            a = st[a_key]
            if a.shape != base.shape:
                raise PayloadError(
                    f"client {i}: {a_key!r} has shape {tuple(a.shape)}, expected {tuple(base.shape)} (FFA-LoRA keeps A frozen)"
                )
            same = torch.equal(a, base) if atol == 0 else bool(((a.to(_F64) - base.to(_F64)).abs() <= atol).all())
            if not same:
                gap = float((a.to(_F64) - base.to(_F64)).abs().max())
                against = "the global A" if reference is not None else "client 0"
                raise PayloadError(
                    f"client {i}: {a_key!r} differs from {against} by up to {gap:.3g} (> atol={atol}); FFA-LoRA needs A frozen"
                )
    a_keys = {a for a, _ in layers.values()}
    out = {k: states[0][k].detach().clone() if k in a_keys else _plain_mean(states, w, k) for k in states[0]}
    parts = {}
    for prefix, (a_key, b_key) in layers.items():
        a2, b2, _ = _factors(out, a_key, b_key, "mean")
        s_mean = _svd_of_product(b2, a2)[1]
        parts[prefix] = (LayerReport(a2.shape[0], _numerical_rank(s_mean, b2.shape[0], a2.shape[1]), 0.0), 0.0, 0.0)
    return out, AggregationReport.from_parts(parts)


def product_space_mean(
    states: Sequence[Delta],
    weights: Sequence[float],
    scaling: ScalingSpec,
    rank: RankSpec | str | None = None,
    *,
    reference: Delta | None = None,
) -> tuple[Delta, AggregationReport]:
    """Exact FedAvg of the effective updates, re-factored to LoRA by truncated SVD.

    Per layer, ``M = sum_i w_i s_i B_i A_i`` (weights normalised), then the
    rank-``rank`` truncation ``M_r`` (Eckart-Young: the closest rank-r matrix)
    is split as ``B = U sqrt(S) / sqrt(s)``, ``A = sqrt(S) V^T / sqrt(s)`` with
    ``s`` the scaling at the output rank, so ``s * B @ A == M_r``. Clients that
    start from the same global factors make ``W0 + M`` the exact FedAvg of
    their effective weights. Inspired by FedEx-LoRA (arXiv:2410.09432) and
    FlexLoRA (arXiv:2402.11505).

    Args:
        states: client adapter states; ranks may differ per client (the
            products are summed in dense space), other keys must match.
        weights: per-client weights (example counts), normalised here.
        scaling: a float, ``{prefix: float}``, or ``(prefix, rank) -> float``
            such as `LoraScaling` (needed when ranks differ or grow).
        rank: output rank: ``None`` the largest client rank, an int or
            ``{prefix: int}``, or ``"lossless"`` = min(sum of client ranks,
            min(out, in)), which never truncates.
        reference: the global state the clients started from. Its A rows fill
            directions the mean leaves empty, and when shapes match the
            output is expressed in the basis closest to it (same product).

    Returns:
        The new state (keys in client 0's order) and an `AggregationReport`
        whose residuals are the relative truncation errors
        ``||M - M_r|| / ||M||``.

    The factors themselves are only defined up to ``B G^-1, G A``: do not
    compare them with the incoming ones, compare products.
    """
    w = _weights(weights, len(states))
    _check_same_keys(states)
    layers = lora_layers(states[0])
    lora_keys = {k for ab in layers.values() for k in ab}
    out: Delta = {k: _plain_mean(states, w, k) for k in states[0] if k not in lora_keys}
    parts = {}
    for prefix, (a_key, b_key) in layers.items():
        bs, as_, cands, ranks, shape = [], [], [], [], None
        for i, (st, wi) in enumerate(zip(states, w)):
            a2, b2, dense_shape = _factors(st, a_key, b_key, f"client {i}")
            if shape is None:
                shape = dense_shape
            elif dense_shape != shape:
                raise PayloadError(
                    f"client {i}: layer {prefix!r} has effective shape {dense_shape}, client 0 has {shape}"
                )
            r = a2.shape[0]
            ranks.append(r)
            bs.append(b2 * (wi * _scaling(scaling, prefix, r)))
            as_.append(a2)
            cands.append(a2 * math.sqrt(wi))
        u, s, vh = _svd_of_product(torch.cat(bs, dim=1), torch.cat(as_))
        r_out = _target_rank(rank, prefix, ranks, min(shape[0], as_[0].shape[1]))
        ref_a = _ref_rows(reference, a_key, as_[0].shape[1])
        b2, a2, rep, dropped, total = _factorize(
            u, s, vh, r_out, _scaling(scaling, prefix, r_out), cands=torch.cat(cands), ref_a=ref_a
        )
        out[a_key], out[b_key] = _unflatten(b2, a2, shape, states[0][a_key].dtype)
        parts[prefix] = (rep, dropped, total)
    return {k: out[k] for k in states[0]}, AggregationReport.from_parts(parts)


def dense_mean(states: Sequence[Delta], weights: Sequence[float], scaling: ScalingSpec) -> Delta:
    """Weighted mean in product space, kept dense: each LoRA pair becomes ``<prefix>.lora_BA.weight``.

    ``sum_i w_i s_i B_i @ A_i`` per layer, whatever each client's rank; other
    keys are averaged plainly. The FlexLoRA aggregate (Bai et al. 2024, arXiv:2402.11505).
    """
    w = _weights(weights, len(states))
    layers = lora_layers(states[0])
    for i, st in enumerate(states[1:], start=1):
        if lora_layers(st).keys() != layers.keys() or set(st) != set(states[0]):
            raise PayloadError(f"client {i} has different keys than client 0")
    lora_keys = {k: p for p, ab in layers.items() for k in ab}
    out: Delta = {}
    for key in states[0]:
        if key not in lora_keys:
            out[key] = _plain_mean(states, w, key)
            continue
        prefix = lora_keys[key]
        a_key, b_key = layers[prefix]
        if key != a_key:
            continue
        acc, shape = None, None
        for i, (st, wi) in enumerate(zip(states, w)):
            a2, b2, dense_shape = _factors(st, a_key, b_key, f"client {i}")
            if shape is not None and dense_shape != shape:
                raise PayloadError(
                    f"client {i}: layer {prefix!r} has effective shape {dense_shape}, client 0 has {shape}"
                )
            shape = dense_shape
            term = (b2 * (wi * _scaling(scaling, prefix, a2.shape[0]))) @ a2
            acc = term if acc is None else acc + term
        out[_dense_key(a_key)] = acc.reshape(shape).to(states[0][a_key].dtype)
    return out


def _dense_svd(value: torch.Tensor) -> Svd:
    m = value.detach().to(_F64)
    return torch.linalg.svd(m.reshape(m.shape[0], -1), full_matrices=False)


def dense_svds(dense: Delta) -> dict[str, Svd]:
    """Thin float64 SVD ``(U, S, Vh)`` of each dense LoRA layer, keyed by prefix."""
    return {p: _dense_svd(dense[d[0]]) for p, d in _dense_layers(dense).items()}


def to_dense(state: Delta, scaling: ScalingSpec) -> Delta:
    """One state in dense form: each LoRA pair replaced by ``scaling * B @ A`` (see `dense_mean`)."""
    return dense_mean([state], [1.0], scaling)


def refactor(
    dense_or_global: Delta,
    rank: RankSpec,
    scaling: ScalingSpec,
    *,
    reference: Delta | None = None,
    svds: Mapping[str, Svd] | None = None,
) -> tuple[Delta, AggregationReport]:
    """`factors_for_rank` with its report (residual = what the rank cut drops).

    ``svds``: `dense_svds` of a dense source, computed once to cut it for many clients.
    """
    if rank is None or isinstance(rank, str):
        raise ConfigError(f"rank must be an int or {{prefix: int}}, got {rank!r}")
    dense = _dense_layers(dense_or_global)
    dense_keys = {d[0]: p for p, d in dense.items()}
    pairs = lora_layers(k for k in dense_or_global if k not in dense_keys)
    a_keys = {ab[0]: p for p, ab in pairs.items()}
    b_keys = {ab[1] for ab in pairs.values()}
    out: Delta = {}
    parts = {}
    for key, value in dense_or_global.items():
        if key in b_keys:
            continue  # handled with its A
        if key in dense_keys:
            prefix = dense_keys[key]
            _, a_key, b_key = dense[prefix]
            shape = tuple(value.shape)
            u, s, vh = svds[prefix] if svds and prefix in svds else _dense_svd(value)
            cands = None
        elif key in a_keys:
            prefix = a_keys[key]
            a_key, b_key = pairs[prefix]
            a2, b2, shape = _factors(dense_or_global, a_key, b_key, "global state")
            u, s, vh = _svd_of_product(b2 * _scaling(scaling, prefix, a2.shape[0]), a2)
            cands = a2
        else:
            out[key] = value.detach().clone()
            continue
        r_out = _target_rank(rank, prefix, [1], 1)
        ref_a = _ref_rows(reference, a_key, vh.shape[1])
        b2, a2, rep, dropped, total = _factorize(
            u, s, vh, r_out, _scaling(scaling, prefix, r_out), cands=cands, ref_a=ref_a
        )
        out[a_key], out[b_key] = _unflatten(b2, a2, shape, value.dtype)
        parts[prefix] = (rep, dropped, total)
    return out, AggregationReport.from_parts(parts)


def factors_for_rank(
    dense_or_global: Delta,
    rank: RankSpec,
    scaling: ScalingSpec,
    *,
    reference: Delta | None = None,
) -> Delta:
    """A client's LoRA factors at ``rank`` from a dense state or a higher-rank global state.

    Truncated SVD per layer (the best rank-``rank`` approximation of the
    effective update, Eckart-Young), split so that
    ``scaling(prefix, rank) * B @ A`` equals it; the HetLoRA/FlexLoRA step that
    hands each client its own rank (Cho et al. 2024; Bai et al. 2024,
    arXiv:2402.11505). A rank-r input asked for at rank r comes back with the
    same product. ``reference`` (e.g. that client's previous state) aligns the
    basis and fills empty directions, as in `product_space_mean`.
    """
    return refactor(dense_or_global, rank, scaling, reference=reference)[0]
