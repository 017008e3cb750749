"""Communication compression of adapter deltas.

    from fedtune.compression import CompressionConfig, build_codec, layout_of

    codec = build_codec(CompressionConfig(codec="topk+ternary", ratio=0.1))
    payload = codec.encode(delta, seed=round_seed)          # client
    delta_hat = codec.decode(payload, layout_of(delta), seed=round_seed)  # server

Codecs (`VALID_CODECS`) chain a sparsifier (top-k, rand-k) with a value coder
(fp16, bf16, int8, int4, ComPEFT ternary, 1-bit sign); the wire format is described in
`fedtune.compression.wire` and the size formulas in `fedtune.compression.codec`.
``small_codec`` sends small tensors (the task head) through a second codec
(`fedtune.compression.split.SplitCodec`). Under secure aggregation, where only sums
travel, `SharedRandK` and the packed residues of `fedtune.compression.masked` apply.
"""

from fedtune.compression.codec import (
    VALID_CODECS,
    ChainCodec,
    Codec,
    build_codec,
    expected_size,
    layout_of,
    make_codec,
)
from fedtune.compression.config import CompressionConfig
from fedtune.compression.feedback import compensate, residual_after
from fedtune.compression.masked import SharedRandK
from fedtune.compression.sparsify import k_for, randk_indices, topk_indices

__all__ = [
    "VALID_CODECS",
    "ChainCodec",
    "Codec",
    "CompressionConfig",
    "SharedRandK",
    "build_codec",
    "compensate",
    "expected_size",
    "k_for",
    "layout_of",
    "make_codec",
    "randk_indices",
    "residual_after",
    "topk_indices",
]
