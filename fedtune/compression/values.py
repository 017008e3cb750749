"""Value coders: how the kept entries of a tensor travel.

Each coder turns a flat float32 vector of ``m`` kept values into bytes and back,
and knows its exact size ``nbytes(m)``:

=========  ===================================================  ==============
coder      value section                                        error / entry
=========  ===================================================  ==============
fp32       ``4m``                                               0
fp16       ``2m`` IEEE half, saturating at +-65504              rel. 2**-11
bf16       ``2m`` bfloat16, round to nearest even               rel. 2**-8
int8       ``4 * nblocks`` f32 scales, then ``m`` int8 in        scale / 2
           [-127, 127] (symmetric, round to nearest)
int4       ``4 * nblocks`` f32 scales, then ``ceil(m/2)``        scale / 2
           bytes, two values per byte (high nibble first),
           stored as ``q + 8`` in [1, 15]; a pad nibble is 0
ternary    ``4`` bytes f32 scale, then ``ceil(m/8)`` sign bits  (ComPEFT)
           (1 = negative, MSB first)
sign       ``4 * nblocks`` f32 scales, then ``ceil(m/8)`` sign  MSE-optimal
           bits (1 = negative, MSB first)                       for the signs
=========  ===================================================  ==============

``nblocks = ceil(m / block_size)``, or 1 scale per nonempty tensor when
``block_size`` is None; ``scale = max|v| / qmax`` over the block, with
``qmax = 127`` (int8) or ``7`` (int4). Blocks run over the kept values in index
order, so after top-k they cover k values, not n positions.

Ternary follows ComPEFT (Yadav et al. 2023, arXiv:2311.13171): every kept
value becomes ``sign(v) * alpha * std``, with ``std`` the unbiased standard
deviation of the sparsified tensor, dropped entries counted as zeros
(``scale="sparse"``, ComPEFT's ``replace_noise_and_constant`` in
``src/merge_utils.py``: ``tensor[mask] = 0`` then ``tensor.std()``), or of
the tensor before sparsification (``scale="dense"``, the ``tv.std()`` of
ComPEFT's ``src/qlora/ties_utils.py``, which its compression experiments
run). With a zero-mean tensor, sparse = dense * sqrt(share of the sum of
squares that top-k keeps): 0.0066 against 0.0100 for N(0, 0.01**2) at ratio
0.1. Stand-alone ternary keeps every nonzero, so there the two are the same. Unlike ComPEFT, which takes one top-k and one std over the
concatenated adapter, this is done per tensor (lora_A and lora_B have
different scales).

Sign is 1-bit quantization with a magnitude per block: every value becomes
``sign(v) * mean|v|`` over its block (or tensor), the scale that minimises the
squared error for the given signs (1-bit SGD, Seide et al. 2014; EF-SignSGD,
Karimireddy et al. 2019, arXiv:1901.09847, which pairs it with error feedback).
Dense, it costs ~1 bit per entry: 32x smaller than fp32. Zeros are sent as
``+scale``, so it is not lossless on exact zeros (error feedback carries that).
``scale="rms"`` sends ``sqrt(mean v**2)`` instead: the decoded block keeps the
L2 norm of the input block (``mean|v|`` shrinks it, by ``sqrt(2/pi)`` for
Gaussian values and more for heavy-tailed ones), so a round's compressed update
moves the model as far as the uncompressed one; the wire format is the same.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch

from fedtune.compression.wire import Reader
from fedtune.errors import PayloadError

FP16_MAX = 65504.0
BF16_MAX = float(np.uint32(0x7F7F0000).view(np.float32))


class ValueCoder(Protocol):
    name: str
    wire_id: int
    lossless: bool
    needs_nonzero: bool  # sign-only coders cannot represent a kept zero

    def nbytes(self, m: int) -> int: ...

    def encode(self, values: np.ndarray, dense: np.ndarray) -> list[bytes]: ...

    def decode(self, r: Reader, m: int, what: str) -> np.ndarray: ...


def _check_finite(a: np.ndarray, what: str) -> None:
    if a.size and not (np.isfinite(a.max()) and np.isfinite(a.min())):
        raise PayloadError(f"{what}: non-finite value in payload")


class Fp32:
    name, wire_id, lossless, needs_nonzero = "fp32", 0, True, False

    def nbytes(self, m: int) -> int:
        return 4 * m

    def encode(self, values: np.ndarray, dense: np.ndarray) -> list[bytes]:
        return [values.astype("<f4", copy=False).tobytes()]

    def decode(self, r: Reader, m: int, what: str) -> np.ndarray:
        out = r.array("<f4", m, f"{what} fp32 values").astype(np.float32)
        _check_finite(out, what)
        return out


class Fp16:
    name, wire_id, lossless, needs_nonzero = "fp16", 1, False, False

    def nbytes(self, m: int) -> int:
        return 2 * m

    def encode(self, values: np.ndarray, dense: np.ndarray) -> list[bytes]:
        return [_to_half(values, torch.float16, FP16_MAX)]

    def decode(self, r: Reader, m: int, what: str) -> np.ndarray:
        return _from_half(r.array("<i2", m, f"{what} fp16 values"), torch.float16, what)


class Bf16:
    """bfloat16: the top 16 bits of fp32, rounded to nearest even (torch's cast)."""

    name, wire_id, lossless, needs_nonzero = "bf16", 2, False, False

    def nbytes(self, m: int) -> int:
        return 2 * m

    def encode(self, values: np.ndarray, dense: np.ndarray) -> list[bytes]:
        return [_to_half(values, torch.bfloat16, BF16_MAX)]

    def decode(self, r: Reader, m: int, what: str) -> np.ndarray:
        return _from_half(r.array("<i2", m, f"{what} bf16 values"), torch.bfloat16, what)


def _to_half(values: np.ndarray, dtype: torch.dtype, limit: float) -> bytes:
    """Cast through torch (vectorized, round to nearest even), saturating at +-limit."""
    if values.size and max(-float(values.min()), float(values.max())) > limit:
        values = np.clip(values, -limit, limit)
    h = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(dtype)
    return h.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()


def _from_half(raw: np.ndarray, dtype: torch.dtype, what: str) -> np.ndarray:
    out = torch.from_numpy(raw.astype(np.int16)).view(dtype).float().numpy()
    _check_finite(out, what)
    return out


class IntQuant:
    """Symmetric uniform quantization with per-tensor or per-block absmax scales.

    Round to nearest, so ``|v - decoded| <= scale / 2`` per entry (Alistarh et
    al. 2017, QSGD, arXiv:1610.02132, without its stochastic rounding; per-block
    scales as in Dettmers et al. 2022, arXiv:2110.02861).
    """

    lossless, needs_nonzero = False, False

    def __init__(self, bits: int, block_size: int | None = None) -> None:
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        self.bits, self.block_size = bits, block_size
        self.qmax = (1 << (bits - 1)) - 1
        self.name = f"int{bits}"
        self.wire_id = 3 if bits == 8 else 4

    def nblocks(self, m: int) -> int:
        if m == 0:
            return 0
        return 1 if self.block_size is None else -(-m // self.block_size)

    def nbytes(self, m: int) -> int:
        return 4 * self.nblocks(m) + (m if self.bits == 8 else -(-m // 2))

    def encode(self, values: np.ndarray, dense: np.ndarray) -> list[bytes]:
        m = values.size
        if m == 0:
            return []
        nb = self.nblocks(m)
        if nb == 1:
            scales = np.array([np.abs(values).max() / self.qmax], dtype=np.float32)
            div = scales[0] if scales[0] > 0 else np.float32(1)
            q = np.rint(values / div)
        else:
            blocks = np.zeros(nb * self.block_size, dtype=np.float32)
            blocks[:m] = values
            blocks = blocks.reshape(nb, self.block_size)
            scales = (np.abs(blocks).max(axis=1) / self.qmax).astype(np.float32)
            div = np.where(scales > 0, scales, np.float32(1))
            q = np.rint(blocks / div[:, None]).reshape(-1)[:m]
        q = np.clip(q, -self.qmax, self.qmax).astype(np.int8)
        if self.bits == 8:
            return [scales.astype("<f4").tobytes(), q.tobytes()]
        nib = (q + 8).astype(np.uint8)
        if m % 2:
            nib = np.append(nib, np.uint8(0))
        return [scales.astype("<f4").tobytes(), ((nib[0::2] << 4) | nib[1::2]).tobytes()]

    def decode(self, r: Reader, m: int, what: str) -> np.ndarray:
        nb = self.nblocks(m)
        scales = r.array("<f4", nb, f"{what} {self.name} scales").astype(np.float32)
        if nb and not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise PayloadError(f"{what}: non-finite or negative {self.name} scale")
        if self.bits == 8:
            q = r.array("i1", m, f"{what} int8 values")
            if m and int(q.min()) < -self.qmax:
                raise PayloadError(f"{what}: int8 value -128 out of range [-127, 127]")
        else:
            raw = r.array("u1", -(-m // 2), f"{what} int4 values")
            nib = np.empty(2 * raw.size, dtype=np.uint8)
            nib[0::2] = raw >> 4
            nib[1::2] = raw & 0x0F
            if m % 2 and nib[m]:
                raise PayloadError(f"{what}: int4 pad nibble is not zero")
            nib = nib[:m]
            if m and int(nib.min()) == 0:
                raise PayloadError(f"{what}: int4 value -8 out of range [-7, 7]")
            q = nib.view(np.int8) - np.int8(8)
        if nb <= 1:
            return q.astype(np.float32) * (scales[0] if nb else np.float32(0))
        return (q.astype(np.float32) * np.repeat(scales, self.block_size)[:m]).astype(np.float32, copy=False)


class Ternary:
    """ComPEFT values: ``sign(v) * alpha * std``, one f32 scale per tensor.

    ``scale="sparse"``: std of the sparsified tensor (kept values, zeros
    elsewhere); ``"dense"``: std of the tensor before sparsification.
    """

    name, wire_id, lossless, needs_nonzero = "ternary", 5, False, True
    SCALES = ("sparse", "dense")

    def __init__(self, alpha: float = 1.0, scale: str = "sparse") -> None:
        if scale not in self.SCALES:
            raise ValueError(f"ternary scale must be one of {self.SCALES}, got {scale!r}")
        self.alpha, self.std_of = alpha, scale

    def nbytes(self, m: int) -> int:
        return 4 + -(-m // 8)

    def scale(self, values: np.ndarray, dense: np.ndarray) -> np.float32:
        """``alpha * std`` with Bessel's correction (torch's default, as ComPEFT); 0 for n < 2.

        ``values`` are the kept entries of ``dense``; for ``"sparse"`` the other
        ``n - m`` entries count as zeros (computed from the kept values alone, in
        float64, without building the sparse tensor).
        """
        n = dense.size
        if n < 2:
            return np.float32(0)
        if self.std_of == "dense":
            return np.float32(self.alpha * float(torch.from_numpy(dense).std()))
        d = values.astype(np.float64)
        mean = float(d.sum()) / n
        d -= mean
        ss = float(d @ d) + (n - d.size) * mean * mean
        return np.float32(self.alpha * math.sqrt(ss / (n - 1)))

    def encode(self, values: np.ndarray, dense: np.ndarray) -> list[bytes]:
        s = np.array([self.scale(values, dense)], dtype="<f4")
        return [s.tobytes(), np.packbits(values < 0).tobytes()]

    def decode(self, r: Reader, m: int, what: str) -> np.ndarray:
        s = r.array("<f4", 1, f"{what} ternary scale")[0]
        if not (np.isfinite(s) and s >= 0):
            raise PayloadError(f"{what}: non-finite or negative ternary scale {float(s)}")
        raw = r.take(-(-m // 8), f"{what} sign bits")
        pad = (-m) % 8
        if pad and raw[-1] & ((1 << pad) - 1):
            raise PayloadError(f"{what}: sign-bit padding is not zero")
        bits = np.unpackbits(raw, count=m)
        return np.array([s, -s], dtype=np.float32)[bits]


class Sign:
    """1-bit values: ``sign(v) * mean|v|`` (or ``* rms(v)``) per block, or per tensor when ``block_size`` is None."""

    name, wire_id, lossless, needs_nonzero = "sign", 6, False, False
    SCALES = ("mean_abs", "rms")

    def __init__(self, block_size: int | None = None, scale: str = "mean_abs") -> None:
        if scale not in self.SCALES:
            raise ValueError(f"sign scale must be one of {self.SCALES}, got {scale!r}")
        self.block_size, self.scale = block_size, scale

    def nblocks(self, m: int) -> int:
        if m == 0:
            return 0
        return 1 if self.block_size is None else -(-m // self.block_size)

    def nbytes(self, m: int) -> int:
        return 4 * self.nblocks(m) + -(-m // 8)

    def encode(self, values: np.ndarray, dense: np.ndarray) -> list[bytes]:
        m = values.size
        if m == 0:
            return []
        mags = np.abs(values).astype(np.float64)
        if self.scale == "rms":
            mags = mags * mags
        if self.nblocks(m) == 1:
            means = np.array([mags.mean()])
        else:
            nb, bs = self.nblocks(m), self.block_size
            sums = np.add.reduceat(mags, np.arange(0, m, bs))
            counts = np.minimum(bs, m - np.arange(0, m, bs))
            means = sums / counts
            assert means.size == nb
        scales = (np.sqrt(means) if self.scale == "rms" else means).astype("<f4")
        return [scales.tobytes(), np.packbits(values < 0).tobytes()]

    def decode(self, r: Reader, m: int, what: str) -> np.ndarray:
        nb = self.nblocks(m)
        scales = r.array("<f4", nb, f"{what} sign scales").astype(np.float32)
        if nb and not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise PayloadError(f"{what}: non-finite or negative sign scale")
        raw = r.take(-(-m // 8), f"{what} sign bits")
        pad = (-m) % 8
        if pad and raw[-1] & ((1 << pad) - 1):
            raise PayloadError(f"{what}: sign-bit padding is not zero")
        signs = 1.0 - 2.0 * np.unpackbits(raw, count=m).astype(np.float32)
        if nb <= 1:
            return signs * (scales[0] if nb else np.float32(0))
        return (signs * np.repeat(scales, self.block_size)[:m]).astype(np.float32, copy=False)
