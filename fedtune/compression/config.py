"""Compression settings, parsed once at the boundary (run_config, TOML, CLI)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedtune.compression.codec import VALID_CODECS
from fedtune.compression.values import Sign, Ternary
from fedtune.errors import ConfigError


@dataclass(frozen=True)
class CompressionConfig:
    """How deltas are compressed on the way up (client -> server) and down.

    Attributes:
        codec: uplink codec, ``[sparsifier+]values`` from `VALID_CODECS`, e.g.
            ``"topk+ternary"`` (ComPEFT, Yadav et al. 2023, arXiv:2311.13171).
        downlink: codec for the server's broadcast of the aggregated delta.
            The server must apply the *decoded* broadcast to its own copy of the
            global adapter so that server and clients stay identical.
        ratio: fraction of entries top-k / rand-k keep per tensor, in (0, 1];
            ``k = min(n, ceil(ratio * n))``.
        block_size: values per int8/int4/sign scale; None = one scale per tensor.
            Flower's run_config cannot hold None: leave the key out instead.
        ternary_alpha: ComPEFT's alpha; ternary values are ``alpha * std``.
        ternary_scale: whose ``std``: ``"sparse"`` (the sparsified tensor, dropped
            entries as zeros: ComPEFT's ``replace_noise_and_constant``) or
            ``"dense"`` (the tensor before sparsification: ComPEFT's compression
            scripts). The same for stand-alone ``ternary``; see `Ternary`.
        sign_scale: the magnitude a ``sign`` block decodes to: ``"mean_abs"``
            (``mean|v|``, least squares for the signs) or ``"rms"``
            (``sqrt(mean v**2)``, keeps the block's L2 norm).
        randk_unbiased: decode rand-k values scaled by ``n/k`` (unbiased but
            higher variance); needs a ``randk`` codec in either direction.
        small_codec: ``"same"`` (every tensor through ``codec``), or the uplink
            codec for tensors with fewer than ``small_numel`` elements (the task
            head, biases), e.g. ``"int4"`` next to a 1-bit ``"sign"`` (`SplitCodec`).
        small_numel: the size under which a tensor counts as small.
        error_feedback: keep what compression dropped and add it to the next
            round's delta (`compensate` / `residual_after`); the client layer
            stores the residual in its per-node state.
    """

    codec: str = "none"
    downlink: str = "none"
    ratio: float = 0.1
    block_size: int | None = None
    ternary_alpha: float = 1.0
    ternary_scale: str = "sparse"
    sign_scale: str = "mean_abs"
    randk_unbiased: bool = False
    small_codec: str = "same"
    small_numel: int = 1024
    error_feedback: bool = False

    def __post_init__(self) -> None:
        errors = _problems(self)
        if errors:
            raise ConfigError("; ".join(errors))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CompressionConfig:
        """Build from plain data, rejecting unknown keys (all problems reported at once)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"compression config must be a mapping, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names), key=str)
        if unknown:
            raise ConfigError(f"unknown compression config key(s) {unknown}; valid keys are {names}")
        return cls(**d)


def _problems(c: CompressionConfig) -> list[str]:
    out = []
    for field in ("codec", "downlink"):
        v = getattr(c, field)
        if not isinstance(v, str) or v not in VALID_CODECS:
            out.append(f"{field}: unknown codec {v!r}; valid codecs are {', '.join(VALID_CODECS)}")
    if not isinstance(c.small_codec, str) or c.small_codec not in ("same", *VALID_CODECS):
        out.append(f"small_codec: must be 'same' or a codec ({', '.join(VALID_CODECS)}), got {c.small_codec!r}")
    elif c.small_codec != "same" and c.codec == "none":
        out.append("small_codec: applies to a compressed uplink; codec is 'none' (every tensor already travels as fp32)")
    if not _is_int(c.small_numel) or not 1 <= c.small_numel < 2**32:
        out.append(f"small_numel: must be a positive integer, got {c.small_numel!r}")
    if not _is_real(c.ratio) or not 0 < c.ratio <= 1:
        out.append(f"ratio: must be a number in (0, 1], got {c.ratio!r}")
    if c.block_size is not None and (not _is_int(c.block_size) or not 1 <= c.block_size < 2**32):
        out.append(f"block_size: must be a positive integer (< 2**32) or None, got {c.block_size!r}")
    if not _is_real(c.ternary_alpha) or not c.ternary_alpha > 0:
        out.append(f"ternary_alpha: must be a finite number > 0, got {c.ternary_alpha!r}")
    if c.ternary_scale not in Ternary.SCALES:
        out.append(f"ternary_scale: must be one of {', '.join(Ternary.SCALES)}, got {c.ternary_scale!r}")
    if c.sign_scale not in Sign.SCALES:
        out.append(f"sign_scale: must be one of {', '.join(Sign.SCALES)}, got {c.sign_scale!r}")
    for field in ("randk_unbiased", "error_feedback"):
        if not isinstance(getattr(c, field), bool):
            out.append(f"{field}: must be true or false, got {getattr(c, field)!r}")
    if c.randk_unbiased is True and not any(str(x).startswith("randk") for x in (c.codec, c.downlink)):
        out.append(f"randk_unbiased: True needs a randk codec, got codec={c.codec!r}, downlink={c.downlink!r}")
    return out


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
