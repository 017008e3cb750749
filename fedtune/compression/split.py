"""Two codecs for one delta: large tensors through one, small tensors through another.

Small tensors (the classification head, biases, norms) are a sliver of the bytes but
can carry much of an update's effect; PowerSGD (Vogels et al. 2019, arXiv:1905.13727)
likewise sends 1-D tensors uncompressed. `SplitCodec` sends every tensor with fewer
than ``small_numel`` elements through ``small`` and the rest through ``large``.
Both sides know the layout, so the split needs no key names on the wire:

    u32 length L of the large payload | large payload (L bytes) | small payload

A part whose tensors are all on the other side is empty (0 bytes, no header).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping

import torch

from fedtune.compression import wire
from fedtune.compression.codec import ChainCodec, Layout, layout_of
from fedtune.delta import Delta
from fedtune.errors import PayloadError

_LEN = struct.Struct("<I")


class SplitCodec:
    """`ChainCodec` ``large`` for tensors of at least ``small_numel`` elements, ``small`` for the rest."""

    def __init__(self, large: ChainCodec, small: ChainCodec, small_numel: int) -> None:
        if small_numel < 1:
            raise ValueError(f"small_numel must be >= 1, got {small_numel}")
        self.large, self.small, self.small_numel = large, small, small_numel
        self.name = f"{large.name}|small<{small_numel}:{small.name}"
        self.lossless = large.lossless and small.lossless
        self.seeded = large.seeded or small.seeded
        self.size_is_exact = large.size_is_exact and small.size_is_exact

    def __repr__(self) -> str:
        return f"SplitCodec({self.name!r})"

    def _is_small(self, shape: tuple[int, ...]) -> bool:
        return math.prod(shape) < self.small_numel

    def _split(self, layout: Layout) -> tuple[dict, dict]:
        big = {k: s for k, s in layout.items() if not self._is_small(s)}
        return big, {k: s for k, s in layout.items() if self._is_small(s)}

    def encode(self, delta: Mapping[str, torch.Tensor], *, seed: int = 0) -> bytes:
        big, small = self._split(layout_of(delta))
        head = self.large.encode({k: delta[k] for k in big}, seed=seed) if big else b""
        tail = self.small.encode({k: delta[k] for k in small}, seed=seed) if small else b""
        return _LEN.pack(len(head)) + head + tail

    def decode(self, payload: bytes, layout: Layout, *, seed: int = 0) -> Delta:
        """Inverse of `encode`; a malformed payload raises `PayloadError`."""
        r = wire.Reader(payload)
        n_head = r.u32("split length")
        head = r.take(n_head, "large-tensor payload").tobytes()
        tail = r.take(r.buf.size - r.pos, "small-tensor payload").tobytes()
        big, small = self._split(layout)
        parts = {}
        for part, codec, sub, what in ((head, self.large, big, "large"), (tail, self.small, small, "small")):
            if not sub:
                if part:
                    raise PayloadError(
                        f"{what}-tensor payload has {len(part)} bytes but the layout has no {what} tensors"
                    )
                continue
            parts.update(codec.decode(part, sub, seed=seed))
        return {k: parts[k] for k in layout}

    def wire_size(self, layout: Layout, delta: Mapping[str, torch.Tensor] | None = None) -> int:
        big, small = self._split(layout)
        return _LEN.size + sum(
            codec.wire_size(sub, delta) for codec, sub in ((self.large, big), (self.small, small)) if sub
        )
