"""The global seed history: what the model is, in FedKSeed.

FedKSeed (Qin et al. 2024, arXiv:2312.06353): the global model after round R is the
initial model plus the replay of rounds 1..R, each round a sparse map from seed index
to aggregated scalar ``c``. Every party (server, clients present all along, clients
joining late) rebuilds it bit for bit from the history alone.

Round numbering: round ``r`` is ``history.entry(r)`` for ``1 <= r <= len(history)``; a
model "at round r" is the initial model with rounds ``1..r`` replayed.

Client recipe, per round (the Flower layer does this):

1. hold the model at round ``r0`` (initial model + ``replay_`` of what it has seen);
   keep a copy of the tuned parameters;
2. run local ZO steps (`fedtune.zo.estimator.train_round_`), send the pairs
   (`fedtune.zo.wire.encode_uplink`);
3. copy the saved parameters back (the local model is discarded), receive rounds
   ``r0+1..R`` (`fedtune.zo.wire.decode_downlink`), ``history.extend_`` them and
   ``replay_(params, history, r0, R, lr)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedtune.errors import PayloadError
from fedtune.zo.estimator import apply_pair_
from fedtune.zo.pool import NamedTensors, SeedPool, named

Pair = tuple[int, float]


@dataclass(frozen=True, eq=False)
class RoundEntry:
    """One round's aggregated scalars: strictly ascending uint32 ``indices`` and finite
    float32 ``scalars``. Zero scalars are dropped (they move nothing), so a round has
    one canonical form and a dense and a sparse encoding decode to equal entries.
    """

    indices: np.ndarray
    scalars: np.ndarray

    def __post_init__(self) -> None:
        idx = np.asarray(self.indices)
        val = np.asarray(self.scalars)
        if idx.ndim != 1 or val.ndim != 1 or idx.shape != val.shape:
            raise PayloadError(f"round entry needs two 1-D arrays of one length, got {idx.shape} and {val.shape}")
        if idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0 or idx.max() >= 2**32):
            raise PayloadError("round entry indices must be integers in [0, 2**32)")
        idx = idx.astype(np.uint32)
        val = val.astype(np.float32)
        if not np.all(np.isfinite(val)):
            bad = int(idx[~np.isfinite(val)][0])
            raise PayloadError(f"round entry has a non-finite scalar at seed index {bad}")
        if idx.size > 1 and not np.all(idx[1:] > idx[:-1]):
            raise PayloadError("round entry indices must be strictly ascending")
        keep = val != 0
        idx, val = np.ascontiguousarray(idx[keep]), np.ascontiguousarray(val[keep])
        idx.setflags(write=False)
        val.setflags(write=False)
        object.__setattr__(self, "indices", idx)
        object.__setattr__(self, "scalars", val)

    @classmethod
    def empty(cls) -> RoundEntry:
        return cls(np.zeros(0, np.uint32), np.zeros(0, np.float32))

    @classmethod
    def from_dense(cls, vector: np.ndarray) -> RoundEntry:
        """From a length-K float32 vector (index = position)."""
        vec = np.asarray(vector, dtype=np.float32)
        idx = np.flatnonzero(vec)
        return cls(idx.astype(np.uint32), vec[idx])

    def dense(self, num_seeds: int) -> np.ndarray:
        """As a length-K float32 vector."""
        if self.indices.size and int(self.indices[-1]) >= num_seeds:
            raise PayloadError(f"seed index {int(self.indices[-1])} outside the pool [0, {num_seeds})")
        out = np.zeros(num_seeds, dtype=np.float32)
        out[self.indices.astype(np.int64)] = self.scalars
        return out

    def pairs(self) -> list[Pair]:
        """``(index, scalar)`` in ascending index order, the replay order."""
        return list(zip(self.indices.tolist(), self.scalars.tolist()))

    @property
    def nnz(self) -> int:
        return int(self.indices.size)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoundEntry):
            return NotImplemented
        return np.array_equal(self.indices, other.indices) and self.scalars.tobytes() == other.scalars.tobytes()

    def __hash__(self) -> int:
        return hash((self.indices.tobytes(), self.scalars.tobytes()))


def check_pair(pair: object, num_seeds: int, where: str) -> Pair:
    try:
        index, scalar = pair  # type: ignore[misc]
    except (TypeError, ValueError):
        raise PayloadError(f"{where}: expected an (index, scalar) pair, got {pair!r}") from None
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
        raise PayloadError(f"{where}: seed index {index!r} is not an integer")
    if not 0 <= int(index) < num_seeds:
        raise PayloadError(f"{where}: unknown seed index {int(index)} (pool has {num_seeds})")
    try:
        value = float(scalar)
    except (TypeError, ValueError):
        raise PayloadError(f"{where}: scalar {scalar!r} is not a number") from None
    if not math.isfinite(value):
        raise PayloadError(f"{where}: non-finite scalar {value} at seed index {int(index)}")
    return int(index), value


def aggregate_pairs(client_pairs: Sequence[Iterable[Pair]], weights: Sequence[float], num_seeds: int) -> RoundEntry:
    """The server's round entry: ``c_s = sum_k (w_k / W) * S_{k,s}``, ``W = sum_k w_k``.

    ``S_{k,s}`` is the sum of client k's scalars for seed s (a seed drawn twice counts
    twice). Why this is FedAvg: a client's steps ``theta_t = theta_{t-1} - lr g_t z_{s_t}``
    telescope to ``theta_T = theta_r - lr * sum_s S_{k,s} z_s``, so the weighted mean of
    the clients' local models is ``theta_r - lr * sum_s c_s z_s``, exactly what
    `replay_` applies. This identity is exact in real arithmetic; it is the average of
    the local ZO *updates*, and each ``g_t`` after the first was measured at the moved
    local model ``theta_{t-1}``, not at ``theta_r`` (FedKSeed's, and local SGD's,
    approximation of a gradient at the global model). In floating point the replay
    differs from a client's local model by rounding only: one float32 rounding of
    ``c_s``, and pairs applied in ascending seed order rather than step order.

    Sums use ``math.fsum`` (exactly rounded), so ``c_s`` does not depend on the order of
    clients or of pairs. Seeds whose ``c_s`` is 0 are left out. Pairs with an unknown
    index or a non-finite scalar raise `PayloadError` naming the client's position;
    drop that client and aggregate again.
    """
    if len(client_pairs) != len(weights):
        raise ValueError(f"got {len(client_pairs)} clients but {len(weights)} weights")
    ws = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in ws):
        raise ValueError(f"weights must be finite and >= 0, got {ws}")
    total = math.fsum(ws)
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    terms: dict[int, list[float]] = {}
    for k, (pairs, w) in enumerate(zip(client_pairs, ws)):
        per_seed: dict[int, list[float]] = {}
        for j, pair in enumerate(pairs):
            index, value = check_pair(pair, num_seeds, f"client {k}, pair {j}")
            per_seed.setdefault(index, []).append(value)
        for index, values in per_seed.items():
            terms.setdefault(index, []).append((w / total) * math.fsum(values))
    indices = sorted(terms)
    with np.errstate(over="ignore"):
        scalars = np.array([math.fsum(terms[i]) for i in indices], dtype=np.float64).astype(np.float32)
    if not np.all(np.isfinite(scalars)):
        bad = indices[int(np.flatnonzero(~np.isfinite(scalars))[0])]
        raise PayloadError(f"aggregated scalar for seed index {bad} overflows float32")
    return RoundEntry(np.array(indices, dtype=np.uint32), scalars)


class SeedHistory:
    """Rounds 1..R of aggregated (seed index, scalar) pairs over one `SeedPool`."""

    def __init__(self, pool: SeedPool, entries: Iterable[RoundEntry] = ()) -> None:
        self.pool = pool
        self._entries: list[RoundEntry] = []
        self.extend_(1, entries)

    @property
    def num_seeds(self) -> int:
        return self.pool.num_seeds

    @property
    def entries(self) -> tuple[RoundEntry, ...]:
        return tuple(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, round_: int) -> RoundEntry:
        """Round ``round_`` (1-based)."""
        if not 1 <= round_ <= len(self._entries):
            raise IndexError(f"round {round_} not in history (rounds 1..{len(self._entries)})")
        return self._entries[round_ - 1]

    def since(self, round_: int) -> list[RoundEntry]:
        """Rounds ``round_+1 .. len(self)``: what a party at round ``round_`` lacks."""
        if not 0 <= round_ <= len(self._entries):
            raise IndexError(f"round {round_} not in 0..{len(self._entries)}")
        return self._entries[round_:]

    def append_(self, entry: RoundEntry) -> int:
        """Add the next round; returns its number."""
        self.extend_(len(self._entries) + 1, [entry])
        return len(self._entries)

    def extend_(self, first_round: int, entries: Iterable[RoundEntry]) -> None:
        """Add rounds ``first_round, first_round+1, ...``; they must follow the last one held.

        Raises `PayloadError` on a gap or an index outside the pool (nothing is added).
        """
        new = list(entries)
        if new and first_round != len(self._entries) + 1:
            raise PayloadError(f"history holds rounds 1..{len(self._entries)}, got rounds from {first_round}")
        for r, e in enumerate(new, start=first_round):
            if not isinstance(e, RoundEntry):
                raise TypeError(f"round {r}: expected a RoundEntry, got {type(e).__name__}")
            if e.nnz and int(e.indices[-1]) >= self.num_seeds:
                raise PayloadError(f"round {r}: unknown seed index {int(e.indices[-1])} (pool has {self.num_seeds})")
        self._entries.extend(new)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SeedHistory):
            return NotImplemented
        return self.pool == other.pool and self._entries == other._entries

    def __repr__(self) -> str:
        return f"SeedHistory(pool={self.pool!r}, rounds={len(self)}, pairs={sum(e.nnz for e in self._entries)})"

    # -- serialization -------------------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (``np.savez``-able), rounds in CSR layout:
        round r's pairs are ``indices/scalars[round_offsets[r-1]:round_offsets[r]]``.
        """
        counts = [e.nnz for e in self._entries]
        return {
            "num_seeds": np.array([self.pool.num_seeds], dtype=np.int64),
            "pool_seed": np.array([self.pool.pool_seed], dtype=np.int64),
            "distribution": np.array([self.pool.distribution]),
            "round_offsets": np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64),
            "indices": np.concatenate([e.indices for e in self._entries] or [np.zeros(0, np.uint32)]),
            "scalars": np.concatenate([e.scalars for e in self._entries] or [np.zeros(0, np.float32)]),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], pool: SeedPool | None = None) -> SeedHistory:
        """Inverse of `to_arrays`; with ``pool`` given, the stored pool must equal it."""
        try:
            stored = SeedPool(
                num_seeds=int(np.asarray(arrays["num_seeds"]).reshape(-1)[0]),
                pool_seed=int(np.asarray(arrays["pool_seed"]).reshape(-1)[0]),
                distribution=str(np.asarray(arrays["distribution"]).reshape(-1)[0]),
            )
            offsets = np.asarray(arrays["round_offsets"], dtype=np.int64)
            indices = np.asarray(arrays["indices"])
            scalars = np.asarray(arrays["scalars"])
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise PayloadError(f"malformed seed history arrays: {e}") from None
        if pool is not None and stored != pool:
            raise PayloadError(f"seed history was written for {stored}, expected {pool}")
        if (
            offsets.ndim != 1
            or offsets.size < 1
            or offsets[0] != 0
            or np.any(np.diff(offsets) < 0)
            or offsets[-1] != indices.size
            or indices.shape != scalars.shape
        ):
            raise PayloadError("malformed seed history arrays: round_offsets do not match indices/scalars")
        entries = [RoundEntry(indices[a:b], scalars[a:b]) for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
        return cls(stored, entries)

    def to_bytes(self) -> bytes:
        """Compact bytes (the downlink format of all rounds, under its own magic)."""
        from fedtune.zo.wire import encode_history

        return encode_history(self)

    @classmethod
    def from_bytes(cls, data: bytes, pool: SeedPool) -> SeedHistory:
        """Inverse of `to_bytes`; raises `PayloadError` if malformed or for another pool."""
        from fedtune.zo.wire import decode_history

        return decode_history(data, pool)


def replay_(
    params: NamedTensors,
    history: SeedHistory,
    from_round: int = 0,
    to_round: int | None = None,
    *,
    lr: float,
) -> None:
    """Move ``params`` from round ``from_round`` to ``to_round`` (default: the last round).

    Applies ``theta <- theta - lr * c_s * z_s`` pair by pair, rounds ascending and seed
    indices ascending within a round, via `fedtune.zo.estimator.apply_pair_`. The order
    is fixed and each pair is applied on its own, so replaying 0->R in one call equals
    replaying 0->r then r->R (late joiners equal clients present all along, bit for
    bit). ``lr`` must be the one the clients used in those rounds; with a per-round
    schedule, replay one round per call with that round's ``lr``.
    """
    end = len(history) if to_round is None else to_round
    if not 0 <= from_round <= end <= len(history):
        raise IndexError(f"cannot replay rounds {from_round}->{end} of a history of {len(history)} rounds")
    items = named(params)
    for r in range(from_round + 1, end + 1):
        for index, scalar in history.entry(r).pairs():
            apply_pair_(items, history.pool, index, scalar, lr)
