"""The seed pool and the perturbations it defines.

FedKSeed (Qin et al. 2024, arXiv:2312.06353) restricts zeroth-order perturbations to
K seeds fixed for the whole run, so a step is fully described by (seed index, scalar).
That only works if every party regenerates exactly the same perturbation ``z`` from a
seed, on every machine, in every process. How this module makes sure of that:

* Seeds come from `fedtune.seeds.derive_seed` (never Python's randomized ``hash``):
  ``seed(i) = derive_seed("seed", pool_seed, i)`` and each parameter gets its own stream
  ``derive_seed("param", seed(i), name)``, drawn from a fresh
  ``torch.Generator(device="cpu")``. A parameter's ``z`` therefore depends on its name
  and numel only, not on which other parameters exist or their order.
* ``"rademacher"`` (default): ``z_j = 1 - 2 * bit_j`` where the bits are the
  little-endian bits of ``torch.randint(0, 256, (ceil(n / 8),), dtype=uint8)``. Only
  integer operations (mt19937, modulo, shifts) produce them, so the bits are identical
  on any machine, any CPU kernel flavour (checked with ``ATEN_CPU_CAPABILITY=default``
  against AVX2 in the tests) and any device: on a GPU only the packed bytes travel.
  Rademacher directions satisfy ``E[z z^T] = I`` like Gaussian ones, which is all the
  two-point estimator needs (Spall 1992, SPSA).
* ``"gaussian"`` (the paper's and MeZO's choice): ``torch.randn`` in float32 on the CPU.
  Same process, same machine: bit-identical. Across machines it is NOT guaranteed:
  torch picks a vectorized Box-Muller kernel by CPU capability, and on torch 2.13 the
  ``default`` and ``AVX2`` kernels give different low bits (|diff| <= 2e-6, in 38% of
  the elements) for the same generator state. Use it only where all parties share one
  CPU kernel flavour and torch version; otherwise replicas drift apart silently.

Update arithmetic: ``theta <- theta + s * z`` with ``s`` rounded to float32 once in
Python; ``s * z`` is computed in float32 (exact for Rademacher, a single correctly
rounded multiply for Gaussian), cast to the parameter's dtype, then added: every
step is one IEEE-754 correctly rounded operation per element, so float32 parameters
get identical bits on CPU and GPU (no fused multiply-add is involved; assumes no
flush-to-zero of subnormals). Other dtypes round the step once more on the cast,
identically everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedtune.errors import ConfigError
from fedtune.seeds import derive_seed

DISTRIBUTIONS = ("rademacher", "gaussian")
MAX_NUM_SEEDS = 2**31
MAX_POOL_SEED = 2**63
_CHUNK = 1 << 16  # elements per CPU chunk: keeps the bit/step buffers in L2; a multiple of 8

NamedTensors = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class SeedPool:
    """K candidate seeds (FedKSeed's pool), identified on the wire by `tag`."""

    num_seeds: int
    pool_seed: int = 0
    distribution: str = "rademacher"

    def __post_init__(self) -> None:
        if not (isinstance(self.num_seeds, int) and 1 <= self.num_seeds <= MAX_NUM_SEEDS):
            raise ConfigError(f"num_seeds={self.num_seeds!r}: must be an integer in [1, {MAX_NUM_SEEDS}]")
        if not (isinstance(self.pool_seed, int) and 0 <= self.pool_seed < MAX_POOL_SEED):
            raise ConfigError(f"pool_seed={self.pool_seed!r}: must be an integer in [0, 2**63)")
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(f"distribution={self.distribution!r}: must be one of {DISTRIBUTIONS}")

    def seed(self, index: int) -> int:
        """The seed behind pool index ``index``."""
        if not 0 <= index < self.num_seeds:
            raise IndexError(f"seed index {index} outside the pool [0, {self.num_seeds})")
        return derive_seed("seed", self.pool_seed, int(index))

    @property
    def tag(self) -> int:
        """32-bit fingerprint of (K, pool_seed, distribution); payload headers carry it."""
        return derive_seed("tag", self.num_seeds, self.pool_seed, self.distribution) & 0xFFFFFFFF

    @property
    def index_bytes(self) -> int:
        """Bytes per seed index on the wire: 2 if K <= 65536, else 4."""
        return 2 if self.num_seeds <= 65536 else 4


def named(params: NamedTensors) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs sorted by name; duplicate names are an error."""
    items = list(params.items()) if isinstance(params, Mapping) else list(params)
    items.sort(key=lambda kv: kv[0])
    for (a, _), (b, _) in zip(items, items[1:]):
        if a == b:
            raise ValueError(f"parameter name {a!r} appears twice")
    return items


def select_params(model: torch.nn.Module, scope: str) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters a ZO step perturbs, sorted by name.

    ``"adapter"``: those with ``requires_grad`` (what PEFT leaves trainable);
    ``"full"``: all (tied weights once, under their first name).
    """
    if scope == "adapter":
        chosen = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    elif scope == "full":
        chosen = list(model.named_parameters())
    else:
        raise ConfigError(f"scope={scope!r}: must be one of ('adapter', 'full')")
    if not chosen:
        raise ValueError(f"model has no parameters in scope {scope!r}")
    return named(chosen)


def _param_generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(derive_seed("param", seed, name))


def _packed_bits(numel: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, ((numel + 7) // 8,), dtype=torch.uint8, generator=gen)


def float_bits(scale: float) -> int:
    return int(np.array([scale], dtype=np.float32).view(np.int32)[0])


def signed_scale_np(packed: np.ndarray, start: int, stop: int, scale_bits: int) -> np.ndarray:
    """``scale * z[start:stop]`` for Rademacher z, by flipping the float32 sign bit (exact)."""
    bits = np.unpackbits(packed[start // 8 : (stop + 7) // 8], bitorder="little", count=stop - start)
    u = bits.astype(np.uint32)
    u <<= 31
    u ^= np.uint32(scale_bits & 0xFFFFFFFF)
    return u.view(np.float32)


def signed_scale_torch(packed: torch.Tensor, numel: int, scale_bits: int) -> torch.Tensor:
    """Same as `signed_scale_np` with torch integer ops, on ``packed``'s device."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[:numel].to(torch.int32)
    sign = bits * torch.iinfo(torch.int32).min  # 0 or 0x80000000, no overflow
    return (sign ^ scale_bits).view(torch.float32)


def perturbation(
    params: Mapping[str, torch.Tensor | Sequence[int]] | Iterable[tuple[str, torch.Tensor | Sequence[int]]],
    seed: int,
    distribution: str = "rademacher",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, z)`` for each parameter, sorted by name (MeZO's ``z``, Malladi et al. 2023).

    ``params`` holds tensors (``z`` then takes their device and dtype) or shapes
    (``z`` is float32 on the CPU). ``seed`` is a pool seed, `SeedPool.seed(i)`.
    """
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"distribution={distribution!r}: must be one of {DISTRIBUTIONS}")
    for name, p in named(params):
        shape = tuple(p.shape) if isinstance(p, torch.Tensor) else tuple(int(s) for s in p)
        numel = int(np.prod(shape, dtype=np.int64))
        gen = _param_generator(seed, name)
        if distribution == "rademacher":
            z = signed_scale_torch(_packed_bits(numel, gen), numel, float_bits(1.0)).reshape(shape)
        else:
            z = torch.randn(numel, generator=gen, dtype=torch.float32).reshape(shape)
        if isinstance(p, torch.Tensor):
            z = z.to(device=p.device, dtype=p.dtype)
        yield name, z


@torch.no_grad()
def perturb_(params: NamedTensors, seed: int, scale: float, distribution: str = "rademacher") -> None:
    """``theta <- theta + float32(scale) * z`` in place, for each parameter (see module doc)."""
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"distribution={distribution!r}: must be one of {DISTRIBUTIONS}")
    scale32 = float(np.float32(scale))
    scale_bits = float_bits(scale32)
    for name, p in named(params):
        numel = p.numel()
        if numel == 0:
            continue
        gen = _param_generator(seed, name)
        data = p.detach()
        flat = data.view(-1) if data.is_contiguous() else data.contiguous().view(-1)
        if distribution == "gaussian":
            step = torch.randn(numel, generator=gen, dtype=torch.float32)
            step.mul_(torch.tensor(scale32, dtype=torch.float32))
            flat.add_(step.to(device=flat.device, dtype=flat.dtype))
        elif flat.device.type == "cpu":
            packed = _packed_bits(numel, gen).numpy()
            for start in range(0, numel, _CHUNK):
                stop = min(numel, start + _CHUNK)
                step = torch.from_numpy(signed_scale_np(packed, start, stop, scale_bits))
                flat[start:stop].add_(step if flat.dtype == torch.float32 else step.to(flat.dtype))
        else:
            packed = _packed_bits(numel, gen).to(flat.device)
            step = signed_scale_torch(packed, numel, scale_bits)
            flat.add_(step if flat.dtype == torch.float32 else step.to(flat.dtype))
        if flat.data_ptr() != data.data_ptr():
            data.copy_(flat.view_as(data))
