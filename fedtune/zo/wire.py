"""Byte formats of FedKSeed payloads (Qin et al. 2024, arXiv:2312.06353: under 18 KB).

All integers and floats little-endian. ``w`` = index width: 2 bytes (uint16) if
K <= 65536, else 4 (uint32). ``tag`` = `SeedPool.tag`, a 32-bit fingerprint of
(K, pool_seed, distribution): a party configured with another pool is refused
instead of silently replaying other directions.

Uplink (client -> server), 16 + n*(w+4) bytes::

    "ZU" | version u8 = 1 | w u8 | K u32 | tag u32 | n u32
    n indices (w bytes each) | n scalars (float32)

Pairs are the client's steps in order; an index may repeat.

Downlink (server -> client: rounds r0+1..R), 20 + sum of per-round sizes::

    "ZD" | version u8 = 1 | w u8 | K u32 | tag u32 | first_round u32 | rounds u32
    per round: kind u8, then
      kind 0 (sparse): m u32 | m indices (w bytes, strictly ascending) | m float32
                       -> 5 + m*(w+4) bytes
      kind 1 (dense):  K float32 (index = position)  -> 1 + 4K bytes

The encoder picks, per round, whichever is smaller (sparse on a tie).
A checkpoint of a whole `SeedHistory` is the downlink of rounds 1..R under magic "ZH".

Decoders raise `fedtune.errors.PayloadError` on a bad magic, version, width, K or tag,
a wrong length (truncated or trailing bytes), an unknown round kind, a seed index
>= K, a non-finite scalar, or sparse indices not strictly ascending.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

import numpy as np

from fedtune.errors import PayloadError
from fedtune.zo.history import Pair, RoundEntry, SeedHistory, check_pair
from fedtune.zo.pool import SeedPool

VERSION = 1
_UP = struct.Struct("<2sBBIII")
_DOWN = struct.Struct("<2sBBIIII")
UPLINK_HEADER_BYTES = _UP.size  # 16
DOWNLINK_HEADER_BYTES = _DOWN.size  # 20
SPARSE, DENSE = 0, 1


def _index_dtype(width: int) -> np.dtype:
    return np.dtype("<u2") if width == 2 else np.dtype("<u4")


def uplink_size(num_pairs: int, pool: SeedPool) -> int:
    """Bytes of an uplink with ``num_pairs`` pairs."""
    return UPLINK_HEADER_BYTES + num_pairs * (pool.index_bytes + 4)


def round_size(entry: RoundEntry, pool: SeedPool) -> int:
    """Bytes one round takes in a downlink: min(sparse, dense), kind byte included."""
    return 1 + min(4 + entry.nnz * (pool.index_bytes + 4), 4 * pool.num_seeds)


def downlink_size(entries: Iterable[RoundEntry], pool: SeedPool) -> int:
    """Bytes of a downlink carrying ``entries``."""
    return DOWNLINK_HEADER_BYTES + sum(round_size(e, pool) for e in entries)


def encode_uplink(pairs: Sequence[Pair], pool: SeedPool) -> bytes:
    """A client's (seed index, scalar) pairs as bytes; scalars are rounded to float32."""
    checked = [check_pair(p, pool.num_seeds, f"pair {j}") for j, p in enumerate(pairs)]
    idx = np.array([i for i, _ in checked], dtype=_index_dtype(pool.index_bytes))
    with np.errstate(over="ignore"):
        val = np.array([v for _, v in checked], dtype=np.float64).astype("<f4")
    if not np.all(np.isfinite(val)):
        raise PayloadError("a scalar overflows float32")
    header = _UP.pack(b"ZU", VERSION, pool.index_bytes, pool.num_seeds, pool.tag, len(checked))
    return header + idx.tobytes() + val.tobytes()


def _check_header(magic: bytes, want: bytes, version: int, width: int, k: int, tag: int, pool: SeedPool) -> None:
    if magic != want:
        raise PayloadError(f"bad magic {magic!r}, expected {want!r}")
    if version != VERSION:
        raise PayloadError(f"unsupported payload version {version} (this side speaks {VERSION})")
    if k != pool.num_seeds:
        raise PayloadError(f"payload is for a pool of K={k}, this side has K={pool.num_seeds}")
    if width != pool.index_bytes:
        raise PayloadError(f"index width {width} bytes is wrong for K={k} (expected {pool.index_bytes})")
    if tag != pool.tag:
        raise PayloadError(f"payload pool tag {tag:#010x} != {pool.tag:#010x}: pool_seed or distribution differ")


def _scalars(buf: memoryview, offset: int, count: int, what: str) -> np.ndarray:
    val = np.frombuffer(buf, dtype="<f4", count=count, offset=offset).astype(np.float32)
    if not np.all(np.isfinite(val)):
        raise PayloadError(f"{what}: non-finite scalar at position {int(np.flatnonzero(~np.isfinite(val))[0])}")
    return val


def decode_uplink(data: bytes, pool: SeedPool, max_pairs: int | None = None) -> list[Pair]:
    """Inverse of `encode_uplink`; ``max_pairs`` (e.g. the configured local steps) caps n."""
    buf = memoryview(bytes(data))
    if len(buf) < UPLINK_HEADER_BYTES:
        raise PayloadError(f"uplink of {len(buf)} bytes is shorter than its {UPLINK_HEADER_BYTES}-byte header")
    magic, version, width, k, tag, n = _UP.unpack_from(buf, 0)
    _check_header(magic, b"ZU", version, width, k, tag, pool)
    if max_pairs is not None and n > max_pairs:
        raise PayloadError(f"uplink carries {n} pairs, at most {max_pairs} allowed")
    want = uplink_size(n, pool)
    if len(buf) != want:
        raise PayloadError(f"uplink of {n} pairs must be {want} bytes, got {len(buf)}")
    idx = np.frombuffer(buf, dtype=_index_dtype(width), count=n, offset=UPLINK_HEADER_BYTES).astype(np.int64)
    if n and idx.max() >= k:
        raise PayloadError(f"uplink: unknown seed index {int(idx.max())} (pool has {k})")
    val = _scalars(buf, UPLINK_HEADER_BYTES + n * width, n, "uplink")
    return list(zip(idx.tolist(), val.tolist()))


def _encode_rounds(magic: bytes, pool: SeedPool, first_round: int, entries: Sequence[RoundEntry]) -> bytes:
    parts = [_DOWN.pack(magic, VERSION, pool.index_bytes, pool.num_seeds, pool.tag, first_round, len(entries))]
    itype = _index_dtype(pool.index_bytes)
    for e in entries:
        if 4 + e.nnz * (pool.index_bytes + 4) <= 4 * pool.num_seeds:
            parts.append(struct.pack("<BI", SPARSE, e.nnz))
            parts.append(e.indices.astype(itype).tobytes())
            parts.append(e.scalars.astype("<f4").tobytes())
        else:
            parts.append(struct.pack("<B", DENSE))
            parts.append(e.dense(pool.num_seeds).astype("<f4").tobytes())
    return b"".join(parts)


def _decode_rounds(data: bytes, magic: bytes, pool: SeedPool) -> tuple[int, list[RoundEntry]]:
    buf = memoryview(bytes(data))
    if len(buf) < DOWNLINK_HEADER_BYTES:
        raise PayloadError(f"payload of {len(buf)} bytes is shorter than its {DOWNLINK_HEADER_BYTES}-byte header")
    got_magic, version, width, k, tag, first_round, rounds = _DOWN.unpack_from(buf, 0)
    _check_header(got_magic, magic, version, width, k, tag, pool)
    if first_round < 1:
        raise PayloadError(f"first round must be >= 1, got {first_round}")
    pos = DOWNLINK_HEADER_BYTES
    if rounds * 5 > len(buf) - pos:  # a round takes at least 5 bytes
        raise PayloadError(f"{rounds} rounds cannot fit in {len(buf) - pos} bytes")
    entries: list[RoundEntry] = []
    for r in range(first_round, first_round + rounds):
        if pos + 1 > len(buf):
            raise PayloadError(f"round {r}: truncated")
        kind = buf[pos]
        pos += 1
        if kind == SPARSE:
            if pos + 4 > len(buf):
                raise PayloadError(f"round {r}: truncated")
            (m,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if m > k or pos + m * (width + 4) > len(buf):
                raise PayloadError(f"round {r}: {m} pairs do not fit (K={k}, {len(buf) - pos} bytes left)")
            idx = np.frombuffer(buf, dtype=_index_dtype(width), count=m, offset=pos).astype(np.int64)
            pos += m * width
            val = _scalars(buf, pos, m, f"round {r}")
            pos += m * 4
            if m and idx.max() >= k:
                raise PayloadError(f"round {r}: unknown seed index {int(idx.max())} (pool has {k})")
            try:
                entries.append(RoundEntry(idx.astype(np.uint32), val))
            except PayloadError as e:
                raise PayloadError(f"round {r}: {e}") from None
        elif kind == DENSE:
            if pos + 4 * k > len(buf):
                raise PayloadError(f"round {r}: truncated dense vector")
            entries.append(RoundEntry.from_dense(_scalars(buf, pos, k, f"round {r}")))
            pos += 4 * k
        else:
            raise PayloadError(f"round {r}: unknown round kind {kind}")
    if pos != len(buf):
        raise PayloadError(f"{len(buf) - pos} trailing bytes after {rounds} rounds")
    return first_round, entries


def encode_downlink(history: SeedHistory, since_round: int) -> bytes:
    """Rounds ``since_round+1 .. len(history)`` for a client that is at round ``since_round``."""
    return _encode_rounds(b"ZD", history.pool, since_round + 1, history.since(since_round))


def decode_downlink(data: bytes, pool: SeedPool) -> tuple[int, list[RoundEntry]]:
    """``(first_round, entries)``; feed them to `SeedHistory.extend_`, which checks continuity."""
    return _decode_rounds(data, b"ZD", pool)


def encode_history(history: SeedHistory) -> bytes:
    """The whole history (rounds 1..R) as bytes, for checkpoints and per-node state."""
    return _encode_rounds(b"ZH", history.pool, 1, history.entries)


def decode_history(data: bytes, pool: SeedPool) -> SeedHistory:
    """Inverse of `encode_history`."""
    first, entries = _decode_rounds(data, b"ZH", pool)
    if first != 1:
        raise PayloadError(f"a stored history starts at round 1, this one at {first}")
    return SeedHistory(pool, entries)
