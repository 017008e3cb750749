"""Compression settings, parsed once at the boundary (run_config, TOML, CLI)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fedtune.compression.codec import VALID_CODECS
from fedtune.compression.values import Sign, Ternary
from fedtune.validation import Section, between, choice, fraction, positive


@dataclass(frozen=True)
class CompressionConfig(Section):
    """How deltas are compressed on the way up (client -> server) and down.

    Attributes:
        codec: uplink codec, ``[sparsifier+]values`` from `VALID_CODECS`, e.g.
            ``"topk+ternary"`` (ComPEFT, Yadav et al. 2023, arXiv:2311.13171).
        downlink: codec for the server's broadcast of the aggregated delta.
            The server must apply the *decoded* broadcast to its own copy of the
            global adapter so that server and clients stay identical.
        downlink_catchup: what a client that missed rounds is sent (with a
            compressed ``downlink``): ``"replay"``, the payload of every round
            since its copy (one public copy for all clients), or ``"delta"``, one
            payload of the global minus the copy it holds, which the server keeps
            per node (one adapter of server memory per node that has taken part).
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

    A setting away from its default that no codec in use (uplink, downlink, small
    tensors) reads is refused: `READERS` says which codecs read which setting.
    """

    SECTION = "compression"
    codec: str = "none"
    downlink: str = "none"
    downlink_catchup: str = "replay"
    ratio: float = 0.1
    block_size: int | None = None
    ternary_alpha: float = 1.0
    ternary_scale: str = "sparse"
    sign_scale: str = "mean_abs"
    randk_unbiased: bool = False
    small_codec: str = "same"
    small_numel: int = 1024
    error_feedback: bool = False

    def problems(self) -> list[str]:
        e: list[str] = []
        for name in ("codec", "downlink"):
            value = getattr(self, name)
            if value not in VALID_CODECS:
                e.append(
                    f"compression.{name}: unknown codec; valid codecs are {', '.join(VALID_CODECS)} (got {value!r})"
                )
        choice(e, "compression.downlink_catchup", self.downlink_catchup, ("replay", "delta"))
        if self.downlink_catchup != "replay" and self.downlink == "none":
            e.append(
                "compression.downlink_catchup: applies to a compressed downlink, and compression.downlink is 'none' "
                f"(every client gets the full adapter) (got {self.downlink_catchup!r})"
            )
        choice(e, "compression.small_codec", self.small_codec, ("same", *VALID_CODECS))
        if self.small_codec != "same" and self.codec == "none":
            e.append(
                "compression.small_codec: applies to a compressed uplink, and compression.codec is 'none' "
                f"(every tensor already travels as fp32) (got {self.small_codec!r})"
            )
        between(e, "compression.small_numel", self.small_numel, 1, 2**32, "[)")
        fraction(e, "compression.ratio", self.ratio)
        if self.block_size is not None:
            between(e, "compression.block_size", self.block_size, 1, 2**32, "[)")
        positive(e, "compression.ternary_alpha", self.ternary_alpha)
        choice(e, "compression.ternary_scale", self.ternary_scale, Ternary.SCALES)
        choice(e, "compression.sign_scale", self.sign_scale, Sign.SCALES)
        # a value already refused for itself is not also reported as unread
        e.extend(p for p in self._unread_problems() if not any(x.startswith(p.split(":")[0] + ":") for x in e))
        return e

    def _unread_problems(self) -> list[str]:
        """Settings away from their defaults that no codec in use reads (they would be ignored)."""
        e: list[str] = []
        small = self.small_codec != "same"
        if self.codec == "none" and self.error_feedback:
            e.append(
                "compression.error_feedback: applies to a compressed uplink, and compression.codec is 'none' "
                "(nothing is dropped to feed back) (got True)"
            )
        if not small and self.changed("small_numel") is not None:
            e.append(
                "compression.small_numel: the size under which compression.small_codec applies, and small_codec is "
                f"'same'; unset it (got {self.small_numel!r})"
            )
        names = [self.codec, self.downlink] + ([self.small_codec] if small else [])
        if any(n not in VALID_CODECS for n in names):
            return e  # which settings apply is moot until every codec is known
        read = settings_read_by(names)
        in_use = f"compression.codec = {self.codec!r}, compression.downlink = {self.downlink!r}" + (
            f", compression.small_codec = {self.small_codec!r}" if small else ""
        )
        for name, readers in READERS.items():
            value = self.changed(name)
            if value is not None and name not in read:
                e.append(f"compression.{name}: read only by {' / '.join(readers)} codecs, and {in_use} (got {value!r})")
        return e


# the codec parts (`VALID_CODECS` names split at "+") that read each setting
READERS = {
    "ratio": ("topk", "randk"),
    "block_size": ("int8", "int4", "sign"),
    "ternary_alpha": ("ternary",),
    "ternary_scale": ("ternary",),
    "sign_scale": ("sign",),
    "randk_unbiased": ("randk",),
}


def settings_read_by(codecs: Iterable[str]) -> set[str]:
    """The `READERS` settings that some part of one of ``codecs`` (`VALID_CODECS` names) reads."""
    parts = {p for name in codecs for p in name.split("+")}
    return {setting for setting, readers in READERS.items() if parts & set(readers)}
