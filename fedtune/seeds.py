"""The one seed derivation: every generator in fedtune is seeded from named parts.

``derive_seed(base, "round", 3)`` is the CRC-32 of the text ``"base/round/3"``:
the same in every process and on every machine, cheap, and independent of
Python's hash randomization. Every party that needs the same stream (a client and
the server decoding its random-k payload, the replicas replaying a FedKSeed
history) derives it from the same parts; streams that must differ differ in a
name (``"dp"``, ``"dp-labels"``, ``"zo-batches"``, ...).
"""

from __future__ import annotations

import zlib


def derive_seed(*parts: int | str) -> int:
    """A 32-bit seed from ints and strings (strings may not contain ``/``, the separator)."""
    text = []
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (int, str)):
            raise TypeError(f"derive_seed takes ints and strings, got {type(part).__name__}")
        if isinstance(part, str) and "/" in part:
            raise ValueError(f"derive_seed: {part!r} contains '/', the separator of the parts")
        text.append(str(part))
    return zlib.crc32("/".join(text).encode("utf-8"))


__all__ = ["derive_seed"]
