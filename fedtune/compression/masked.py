"""Encodings that secure aggregation can sum: shared-seed rand-k and packed masked residues.

Secure aggregation (SecAgg+, Bell et al. 2020, ePrint 2020/704, after Bonawitz et al.
2017, "Practical Secure Aggregation for Privacy-Preserving Machine Learning") adds the
clients' integer vectors under pairwise masks modulo a power of two ``M``; the server
learns only their sum. Two encodings compose with that:

- `SharedRandK`: every client of a round keeps the *same* ``k`` coordinates of each
  tensor, drawn from the round seed exactly as the ``randk`` codec draws them
  (`randk_indices` at the tensor's position in the layout), so the masked sum of the
  kept values is the sum of the clients' sparsified deltas, and only ``k`` values
  (not ``n``) are quantized, masked and sent (random masks, Konečný et al. 2016,
  arXiv:1610.05492). Encode and decode are linear: decoding the mean of encodings is
  the mean of the decodings, which is what lets the sum stay under the masks.
- `pack_residues` / `unpack_residues`: a masked entry is a residue in ``[0, M)``.
  Flower's ``secaggplus_mod`` ships each vector as an int64 ``.npy`` (8 bytes an
  entry); packed at ``log2(M)`` bits it takes ``ceil(count * bits / 8)`` bytes after an
  11-byte header (`RESIDUE_HEADER`).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping

import numpy as np
import torch

from fedtune.compression.sparsify import k_for, randk_indices
from fedtune.delta import Delta
from fedtune.errors import PayloadError

Layout = Mapping[str, tuple[int, ...]]

RESIDUE_MAGIC = b"FR"
RESIDUE_HEADER = struct.Struct("<2sBQ")
"""magic ``b"FR"``, u8 bits per residue, u64 residue count; then the residues, LSB first."""
_CHUNK = 1 << 14  # residues packed at a time: a multiple of 8, so every chunk ends on a byte


class SharedRandK:
    """Rand-k whose coordinates every client of a round shares; the kept values travel as plain numbers.

    ``ratio`` as in ``compression.ratio`` (``k = min(n, ceil(ratio * n))`` per tensor;
    ``ratio = 1`` keeps everything: the dense delta, flattened). ``unbiased`` scales the
    decoded values by ``n/k`` (``compression.randk_unbiased``), as `ChainCodec` does.
    The coordinates of tensor ``i`` of the layout are ``randk_indices(n, k, seed, i)``,
    those of ``make_codec("randk", ratio=ratio)`` for the same layout and seed.
    """

    def __init__(self, ratio: float = 1.0, *, unbiased: bool = False) -> None:
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
        self.ratio, self.unbiased = ratio, unbiased

    def __repr__(self) -> str:
        return f"SharedRandK(ratio={self.ratio!r}, unbiased={self.unbiased!r})"

    def size(self, layout: Layout) -> int:
        """How many values `encode` returns for a delta of ``layout``."""
        return sum(k_for(math.prod(shape), self.ratio) for shape in layout.values())

    def positions(self, layout: Layout, *, seed: int) -> dict[str, np.ndarray]:
        """The kept flat positions of each tensor (sorted), drawn from ``seed``."""
        out = {}
        for i, (key, shape) in enumerate(layout.items()):
            n = math.prod(shape)
            out[key] = randk_indices(n, k_for(n, self.ratio), seed, i)
        return out

    def encode(self, delta: Mapping[str, torch.Tensor], *, seed: int) -> np.ndarray:
        """The kept values of ``delta``, tensor after tensor in its order, as one float32 vector."""
        layout = {k: tuple(v.shape) for k, v in delta.items()}
        parts = []
        for key, idx in self.positions(layout, seed=seed).items():
            x = delta[key].detach().to("cpu", torch.float32).reshape(-1).numpy()
            parts.append(x[idx])
        out = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        if not np.isfinite(out).all():
            raise ValueError("the delta has non-finite values; refusing to encode")
        return out

    def decode(self, values: np.ndarray, layout: Layout, *, seed: int) -> Delta:
        """The full-layout delta (zeros off the kept coordinates) whose kept values are ``values``."""
        values = np.asarray(values, dtype=np.float32).reshape(-1)
        if values.size != self.size(layout):
            raise PayloadError(f"{values.size} values for a layout that keeps {self.size(layout)}")
        out: Delta = {}
        at = 0
        for key, idx in self.positions(layout, seed=seed).items():
            n, k = math.prod(layout[key]), idx.size
            flat = np.zeros(n, dtype=np.float32)
            flat[idx] = values[at : at + k]
            if self.unbiased and k:
                flat[idx] *= np.float32(n / k)
            at += k
            out[key] = torch.from_numpy(flat).reshape(layout[key])
        return out


def residue_bits(modulus: int) -> int:
    """Bits of one residue modulo ``modulus``, a power of two."""
    if modulus < 2 or modulus & (modulus - 1):
        raise ValueError(f"modulus must be a power of two >= 2, got {modulus!r}")
    return modulus.bit_length() - 1


def packed_size(count: int, bits: int) -> int:
    """Bytes of `pack_residues` for ``count`` residues of ``bits`` bits."""
    return RESIDUE_HEADER.size + -(-count * bits // 8)


def pack_residues(values: np.ndarray, bits: int) -> bytes:
    """A 1-D array of integers in ``[0, 2**bits)`` at ``bits`` bits each (little-endian bit order)."""
    v = np.asarray(values)
    if v.ndim != 1 or v.dtype.kind not in "iu":
        raise ValueError(f"expected a 1-D integer array, got {v.dtype} of shape {v.shape}")
    if not 1 <= bits <= 63:
        raise ValueError(f"bits must be in [1, 63], got {bits}")
    if v.size and (int(v.min()) < 0 or int(v.max()) >> bits):
        raise ValueError(f"values outside [0, 2**{bits})")
    u = v.astype("<u8")
    parts = [RESIDUE_HEADER.pack(RESIDUE_MAGIC, bits, u.size)]
    if bits % 8 == 0:
        parts.append(u.view(np.uint8).reshape(-1, 8)[:, : bits // 8].tobytes())
    else:
        for s in range(0, u.size, _CHUNK):
            b = np.unpackbits(u[s : s + _CHUNK].view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
            parts.append(np.packbits(b[:, :bits].reshape(-1), bitorder="little").tobytes())
    return b"".join(parts)


def unpack_residues(payload: bytes, bits: int, count: int | None = None) -> np.ndarray:
    """Inverse of `pack_residues` (int64); `PayloadError` for anything else, or another ``count`` when given."""
    if len(payload) < RESIDUE_HEADER.size:
        raise PayloadError(f"packed residues: {len(payload)} bytes, shorter than the header")
    magic, got_bits, n = RESIDUE_HEADER.unpack_from(payload)
    if magic != RESIDUE_MAGIC:
        raise PayloadError(f"packed residues: bad magic {magic!r}")
    if got_bits != bits:
        raise PayloadError(f"packed residues: {got_bits} bits a residue, expected {bits}")
    if count is not None and n != count:
        raise PayloadError(f"packed residues: {n} of them, expected {count}")
    if len(payload) != packed_size(n, bits):
        raise PayloadError(
            f"packed residues: {len(payload)} bytes, {n} residues of {bits} bits need {packed_size(n, bits)}"
        )
    data = np.frombuffer(payload, dtype=np.uint8, offset=RESIDUE_HEADER.size)
    if bits % 8 == 0:
        full = np.zeros((n, 8), dtype=np.uint8)
        full[:, : bits // 8] = data.reshape(n, bits // 8)
        return full.view("<u8").reshape(-1).astype(np.int64)
    if n * bits % 8 and data[-1] >> (n * bits % 8):
        raise PayloadError("packed residues: nonzero padding bits")
    out = np.empty(n, dtype=np.int64)
    for s in range(0, n, _CHUNK):
        m = min(_CHUNK, n - s)
        start = s * bits // 8
        b = np.unpackbits(data[start : start + -(-m * bits // 8)], bitorder="little")[: m * bits]
        full = np.zeros((m, 64), dtype=np.uint8)
        full[:, :bits] = b.reshape(m, bits)
        out[s : s + m] = np.packbits(full, axis=1, bitorder="little").view("<u8").reshape(-1)
    return out


__all__ = [
    "RESIDUE_HEADER",
    "SharedRandK",
    "pack_residues",
    "packed_size",
    "residue_bits",
    "unpack_residues",
]
