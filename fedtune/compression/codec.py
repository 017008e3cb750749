"""Codecs for adapter deltas: a sparsifier chained with a value coder.

Every codec name is ``[sparsifier+]values`` and maps to one `ChainCodec`:

============== ============ ========= ==========================================
name           sparsifier   values    wire bytes per tensor of n elements
============== ============ ========= ==========================================
none           dense        fp32      4n
fp16, bf16     dense        fp16/bf16 2n
int8           dense        int8      4*nblocks(n) + n
int4           dense        int4      4*nblocks(n) + ceil(n/2)
ternary        nonzero      ternary   5 + I + 4 + ceil(nnz/8)
sign           dense        sign      4*nblocks(n) + ceil(n/8)   (1 bit / entry)
topk           topk         fp32      5 + I + 4k
topk+V         topk         V         5 + I + V.nbytes(k)
randk          randk        fp32      5 + 4k            (indices from the seed)
randk+V        randk        V         5 + V.nbytes(k)   (V not ternary)
============== ============ ========= ==========================================

plus a 20-byte header per payload (`fedtune.compression.wire`). ``I`` is the
index section: ``ceil(n/8)`` (bitmap) or ``4 + varint bytes`` (delta-coded
positions), whichever is smaller, chosen per tensor. ``k = min(n, ceil(ratio*n))``
(fewer for top-k only when the tensor has fewer than k nonzeros). A chain sends
its positions once; the value coder only sees the kept values.

`expected_size` evaluates these formulas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from fedtune.compression import wire
from fedtune.compression.sparsify import Dense, NonZero, RandK, Sparsifier, TopK
from fedtune.compression.values import Bf16, Fp16, Fp32, IntQuant, Sign, Ternary, ValueCoder
from fedtune.delta import Delta
from fedtune.errors import ConfigError, PayloadError

if TYPE_CHECKING:
    from fedtune.compression.config import CompressionConfig
    from fedtune.compression.split import SplitCodec

Layout = Mapping[str, tuple[int, ...]]

SPARSIFIERS = ("topk", "randk")
VALUE_CODERS = ("fp16", "bf16", "int8", "int4", "ternary", "sign")
VALID_CODECS: tuple[str, ...] = (
    ("none", *VALUE_CODERS, *SPARSIFIERS)
    + tuple(f"topk+{v}" for v in VALUE_CODERS)
    + tuple(f"randk+{v}" for v in VALUE_CODERS if v != "ternary")
)
"""Every accepted codec name. ``randk+ternary`` is absent: rand-k may pick exact
zeros, which a sign bit cannot carry."""

_FLAG_RESCALE = 1


@runtime_checkable
class Codec(Protocol):
    """Turns a delta into bytes and back; the receiver knows the layout.

    ``layout`` is the ordered key -> shape map of the encoded delta (see
    `layout_of`); decoded tensors are float32. ``seed`` is the per-round seed
    shared by all clients and the server (only rand-k uses it). ``decode``
    raises `PayloadError` for any malformed or mismatched payload.
    """

    name: str
    lossless: bool

    def encode(self, delta: Mapping[str, torch.Tensor], *, seed: int = 0) -> bytes: ...

    def decode(self, payload: bytes, layout: Layout, *, seed: int = 0) -> dict[str, torch.Tensor]: ...


def layout_of(delta: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The ordered key -> shape map a receiver passes to `Codec.decode`."""
    return {k: tuple(v.shape) for k, v in delta.items()}


class ChainCodec:
    """A `Sparsifier` followed by a `ValueCoder`, sharing one index section.

    ``rescale`` (rand-k only) multiplies decoded values by ``n/k`` so the
    decoded delta is an unbiased estimate (Stich et al. 2018, arXiv:1809.07599);
    leave it off with error feedback, which corrects the bias instead.
    """

    def __init__(self, sparsifier: Sparsifier, values: ValueCoder, *, rescale: bool = False) -> None:
        if values.needs_nonzero and sparsifier.keeps_zeros:
            raise ConfigError(f"codec: {values.name} values need top-k or stand-alone use, not {sparsifier.name}")
        if rescale and not isinstance(sparsifier, RandK):
            raise ConfigError(f"randk_unbiased: only applies to randk, not {sparsifier.name}")
        self.sparsifier, self.values, self.rescale = sparsifier, values, rescale
        self.codec_id = 16 * sparsifier.wire_id + values.wire_id
        self.name = _name_of(sparsifier, values)
        self.lossless = sparsifier.lossless and values.lossless and not rescale
        self.seeded = isinstance(sparsifier, RandK)
        self.size_is_exact = isinstance(sparsifier, (Dense, RandK))
        self._block = getattr(values, "block_size", None) or 0

    def __repr__(self) -> str:
        return f"ChainCodec({self.name!r})"

    # ------------------------------------------------------------------ encode

    def encode(self, delta: Mapping[str, torch.Tensor], *, seed: int = 0) -> bytes:
        """Compress ``delta`` (float tensors, any shapes) into one payload."""
        layout = layout_of(delta)
        parts = [self._header(layout, seed)]
        for i, (key, t) in enumerate(delta.items()):
            x = _flat32(t, key)
            sel = self.sparsifier.select(x, seed=seed, index=i)
            idx, mask, _ = sel
            parts += self.sparsifier.encode_index(x.size, sel)
            vals = x if idx is None and mask is None else (x[idx] if idx is not None else x[mask])
            parts += self.values.encode(vals, x)
        return b"".join(parts)

    def _header(self, layout: Layout, seed: int) -> bytes:
        return wire.HEADER.pack(
            wire.MAGIC,
            wire.VERSION,
            self.codec_id,
            _FLAG_RESCALE if self.rescale else 0,
            len(layout),
            wire.layout_crc(layout),
            self._block,
            wire.seed_tag(seed) if self.seeded else 0,
        )

    # ------------------------------------------------------------------ decode

    def decode(self, payload: bytes, layout: Layout, *, seed: int = 0) -> Delta:
        """Inverse of `encode`; any malformed or mismatched payload raises `PayloadError`."""
        r = wire.Reader(payload)
        self._check_header(r, layout, seed)
        out: Delta = {}
        for i, (key, shape) in enumerate(layout.items()):
            n = math.prod(shape)
            what = f"tensor {i} ({key!r})"
            idx, mask, k = self.sparsifier.positions(r, n, seed=seed, index=i, what=what)
            with np.errstate(over="ignore"):  # an overflow to inf is refused just below, without a warning
                vals = self.values.decode(r, k, what)
                if self.rescale and k:
                    vals = vals * np.float32(n / k)
            if not np.isfinite(vals).all():  # e.g. a huge (finite) scale times 127 overflows
                raise PayloadError(f"{what}: decoded values are not finite")
            if idx is None and mask is None:
                flat = vals
            else:
                flat = np.zeros(n, dtype=np.float32)
                flat[idx if idx is not None else mask] = vals
            out[key] = torch.from_numpy(flat).reshape(shape)
        r.finish()
        return out

    def _check_header(self, r: wire.Reader, layout: Layout, seed: int) -> None:
        head = r.take(wire.HEADER_SIZE, "header")
        magic, version, codec_id, flags, count, crc, block, tag = wire.HEADER.unpack(head.tobytes())
        if magic != wire.MAGIC:
            raise PayloadError(
                f"not a fedtune compressed payload (magic byte 0x{magic:02x}, expected 0x{wire.MAGIC:02x})"
            )
        if version != wire.VERSION:
            raise PayloadError(f"unsupported wire version {version} (this build reads {wire.VERSION})")
        if codec_id not in _NAME_BY_ID:
            raise PayloadError(f"unknown codec id 0x{codec_id:02x}")
        if codec_id != self.codec_id:
            raise PayloadError(
                f"payload was encoded with codec {_NAME_BY_ID[codec_id]!r}, this decoder is {self.name!r}"
            )
        want_flags = _FLAG_RESCALE if self.rescale else 0
        if flags != want_flags:
            raise PayloadError(f"header flags 0x{flags:02x} do not match this decoder (0x{want_flags:02x})")
        if block != self._block:
            raise PayloadError(f"payload block size {block} differs from this decoder's {self._block}")
        if count != len(layout):
            raise PayloadError(f"layout mismatch: payload has {count} tensors, layout has {len(layout)}")
        if crc != wire.layout_crc(layout):
            raise PayloadError("layout mismatch: tensor keys, shapes or order differ from the sender's")
        if self.seeded and tag != wire.seed_tag(seed):
            raise PayloadError(f"seed mismatch: payload was encoded with another round seed than {seed}")
        if not self.seeded and tag != 0:
            raise PayloadError(f"seed tag 0x{tag:08x} set on an unseeded codec")

    # -------------------------------------------------------------------- size

    def wire_size(self, layout: Layout, delta: Mapping[str, torch.Tensor] | None = None) -> int:
        """Payload bytes by the formulas in the module docstring (see `expected_size`)."""
        total = wire.HEADER_SIZE
        for i, (key, shape) in enumerate(layout.items()):
            n = math.prod(shape)
            if isinstance(self.sparsifier, Dense):
                total += self.values.nbytes(n)
            elif self.seeded:
                total += wire.INDEX_HEADER_SIZE + self.values.nbytes(self.sparsifier.max_kept(n))
            elif delta is None:  # upper bound: k kept, bitmap indices
                total += wire.INDEX_HEADER_SIZE + -(-n // 8) + self.values.nbytes(self.sparsifier.max_kept(n))
            else:
                idx, mask, k = self.sparsifier.select(_flat32(delta[key], key), seed=0, index=i)
                if idx is None and k + wire.VARINT_LEN_SIZE < -(-n // 8):
                    idx = np.flatnonzero(mask)
                total += wire.INDEX_HEADER_SIZE + wire.index_nbytes(n, idx, k)[1] + self.values.nbytes(k)
        return total


def expected_size(codec: ChainCodec, layout: Layout, delta: Mapping[str, torch.Tensor] | None = None) -> int:
    """Exact payload length of ``codec.encode(delta)`` for a delta with this ``layout``.

    For dense and rand-k codecs the size depends on the layout only. For top-k
    and stand-alone ternary it also depends on where the kept entries are (the
    bitmap/varint choice) and, rarely, on how many nonzeros there are: pass the
    ``delta`` for the exact size, or leave it out for an upper bound (every
    tensor keeping k entries with a bitmap); ``codec.size_is_exact`` tells which.
    """
    return codec.wire_size(layout, delta)


def make_codec(
    name: str,
    *,
    ratio: float = 0.1,
    block_size: int | None = None,
    ternary_alpha: float = 1.0,
    ternary_scale: str = "sparse",
    sign_scale: str = "mean_abs",
    randk_unbiased: bool = False,
) -> ChainCodec:
    """Codec for one name of `VALID_CODECS`; arguments as in `CompressionConfig`, which validates
    those this codec reads (the others are not its to use)."""
    from fedtune.compression.config import CompressionConfig, settings_read_by  # config imports this module

    settings = {
        "ratio": ratio,
        "block_size": block_size,
        "ternary_alpha": ternary_alpha,
        "ternary_scale": ternary_scale,
        "sign_scale": sign_scale,
        "randk_unbiased": randk_unbiased,
    }
    read = settings_read_by([name])
    CompressionConfig(codec=name, **{k: v for k, v in settings.items() if k in read})
    sparse_name, _, value_name = name.rpartition("+")
    if not sparse_name and value_name in SPARSIFIERS:
        sparse_name, value_name = value_name, "fp32"
    values: ValueCoder = {
        "none": Fp32,
        "fp32": Fp32,
        "fp16": Fp16,
        "bf16": Bf16,
        "int8": lambda: IntQuant(8, block_size),
        "int4": lambda: IntQuant(4, block_size),
        "ternary": lambda: Ternary(ternary_alpha, ternary_scale),
        "sign": lambda: Sign(block_size, sign_scale),
    }[value_name]()
    if sparse_name == "topk":
        sparsifier: Sparsifier = TopK(ratio)
    elif sparse_name == "randk":
        sparsifier = RandK(ratio)
    else:
        sparsifier = NonZero() if value_name == "ternary" else Dense()
    return ChainCodec(sparsifier, values, rescale=randk_unbiased)


def build_codec(
    config: CompressionConfig, direction: Literal["uplink", "downlink"] = "uplink"
) -> ChainCodec | SplitCodec:
    """The client->server (``config.codec``, split by ``small_codec``) or server->client (``config.downlink``) codec."""
    if direction not in ("uplink", "downlink"):
        raise ConfigError(f"direction: must be 'uplink' or 'downlink', got {direction!r}")

    def codec(name: str) -> ChainCodec:
        return make_codec(
            name,
            ratio=config.ratio,
            block_size=config.block_size,
            ternary_alpha=config.ternary_alpha,
            ternary_scale=config.ternary_scale,
            sign_scale=config.sign_scale,
            randk_unbiased=config.randk_unbiased and name.startswith("randk"),
        )

    if direction == "downlink":
        return codec(config.downlink)
    if config.small_codec == "same":
        return codec(config.codec)
    from fedtune.compression.split import SplitCodec

    return SplitCodec(codec(config.codec), codec(config.small_codec), config.small_numel)


def _name_of(sparsifier: Sparsifier, values: ValueCoder) -> str:
    if isinstance(sparsifier, (Dense, NonZero)):
        return "none" if values.name == "fp32" else values.name
    return sparsifier.name if values.name == "fp32" else f"{sparsifier.name}+{values.name}"


def _flat32(t: torch.Tensor, key: str) -> np.ndarray:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"delta[{key!r}] must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
    if t.numel() >= 1 << 32:
        raise ValueError(f"delta[{key!r}] has {t.numel()} elements; the wire format allows < 2**32 per tensor")
    x = t.detach().to("cpu", torch.float32).contiguous().reshape(-1).numpy()
    if x.size and not (np.isfinite(x.max()) and np.isfinite(x.min())):
        raise ValueError(f"delta[{key!r}] has non-finite values; refusing to encode")
    return x


def _all_ids() -> dict[int, str]:
    ids = {}
    for name in VALID_CODECS:
        c = make_codec(name)
        ids[c.codec_id] = name
    return ids


_NAME_BY_ID = _all_ids()
