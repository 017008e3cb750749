"""Tests for fedtune.compression: codecs, wire format, config, error feedback."""

from __future__ import annotations

import dataclasses
import math
import statistics
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.compression import (
    VALID_CODECS,
    Codec,
    CompressionConfig,
    build_codec,
    compensate,
    expected_size,
    k_for,
    layout_of,
    make_codec,
    randk_indices,
    residual_after,
    topk_indices,
    wire,
)
from fedtune.errors import ConfigError, PayloadError

torch.set_num_threads(1)
HEADER = 20
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rand_delta(seed: int = 0, shapes=((3, 5), (1000,), (7,), (4, 64))) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"base_model.model.layer.{i}.lora_A.weight": torch.randn(s, generator=g) * 1e-3 for i, s in enumerate(shapes)
    }


def roundtrip(codec, delta, seed=0):
    payload = codec.encode(delta, seed=seed)
    return payload, codec.decode(payload, layout_of(delta), seed=seed)


@st.composite
def deltas(draw, max_n: int = 300):
    shapes = draw(st.lists(st.integers(0, max_n), min_size=0, max_size=4))
    seed = draw(st.integers(0, 2**31))
    zero_frac = draw(st.sampled_from([0.0, 0.5]))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, n in enumerate(shapes):
        x = torch.randn(n, generator=g) * draw(st.sampled_from([1e-4, 1.0, 1e3]))
        x[torch.rand(n, generator=g) < zero_frac] = 0
        out[f"t{i}"] = x
    return out


# ------------------------------------------------------------------- lossless


@FAST
@given(deltas())
def test_none_roundtrip_is_exact(delta):
    codec = make_codec("none")
    assert codec.lossless
    _, out = roundtrip(codec, delta)
    assert list(out) == list(delta)
    for k in delta:
        assert out[k].dtype == torch.float32 and torch.equal(out[k], delta[k])


@pytest.mark.parametrize("name,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_roundtrip_exact_on_representable_values(name, dtype):
    delta = {k: v.to(dtype).float() for k, v in rand_delta(1).items()}
    _, out = roundtrip(make_codec(name), delta)
    for k in delta:
        assert torch.equal(out[k], delta[k])


@pytest.mark.parametrize("name", ["topk", "randk", "topk+fp16"])
def test_ratio_one_keeps_everything(name):
    delta = rand_delta(2)
    if name == "topk+fp16":
        delta = {k: v.half().float() for k, v in delta.items()}
    codec = make_codec(name, ratio=1.0)
    _, out = roundtrip(codec, delta)
    assert all(torch.equal(out[k], delta[k]) for k in delta)
    assert codec.lossless == (name != "topk+fp16")


def test_decode_returns_float32_of_layout_shapes_from_any_float_input():
    delta = {"a": torch.randn(2, 3, 4, dtype=torch.float64), "b": torch.randn(5, dtype=torch.bfloat16)}
    for name in VALID_CODECS:
        _, out = roundtrip(make_codec(name), delta)
        assert {k: tuple(v.shape) for k, v in out.items()} == layout_of(delta)
        assert all(v.dtype == torch.float32 for v in out.values())


@pytest.mark.parametrize("name", VALID_CODECS)
def test_every_codec_handles_empty_and_zero_tensors(name):
    codec = make_codec(name, block_size=4 if "int" in name else None)
    assert isinstance(codec, Codec) and codec.name == name
    delta = {"empty": torch.zeros(0, 3), "zeros": torch.zeros(9), "one": torch.tensor([0.25])}
    payload, out = roundtrip(codec, delta)
    assert out["empty"].shape == (0, 3) and torch.equal(out["zeros"], torch.zeros(9))
    assert len(payload) == expected_size(codec, layout_of(delta), delta)
    assert codec.decode(codec.encode({}), {}) == {}


# ------------------------------------------------------------------- lossy bounds


def block_scales(x: torch.Tensor, block: int | None, qmax: int) -> torch.Tensor:
    """Per-entry scale by hand: absmax of the entry's block / qmax (float32)."""
    flat = x.reshape(-1)
    b = block or max(flat.numel(), 1)
    out = torch.empty_like(flat)
    for s in range(0, flat.numel(), b):
        out[s : s + b] = (flat[s : s + b].abs().max() / qmax).to(torch.float32)
    return out


@FAST
@given(deltas(), st.sampled_from(["int8", "int4"]), st.sampled_from([None, 1, 7, 64]))
def test_int_quantization_error_at_most_half_a_step(delta, name, block):
    qmax = 127 if name == "int8" else 7
    _, out = roundtrip(make_codec(name, block_size=block), delta)
    for k, x in delta.items():
        step = block_scales(x, block, qmax)
        err = (out[k].reshape(-1) - x.reshape(-1)).abs()
        assert torch.all(err <= step / 2 * (1 + 1e-5) + 1e-30), (k, float((err - step / 2).max()))


def test_int8_golden_values():
    x = torch.tensor([1.27, -0.635, 0.0, 0.004, 0.006])
    _, out = roundtrip(make_codec("int8"), {"w": x})
    s = np.float32(1.27) / np.float32(127)  # absmax / 127
    want = np.array([127, -64, 0, 0, 1], dtype=np.float32) * s  # -63.5 rounds to even -64
    np.testing.assert_array_equal(out["w"].numpy(), want)


@FAST
@given(deltas())
def test_fp16_bf16_relative_error(delta):
    for name, rel in (("fp16", 2.0**-11), ("bf16", 2.0**-8)):
        _, out = roundtrip(make_codec(name), delta)
        for k, x in delta.items():
            normal = x.abs() >= (6.2e-5 if name == "fp16" else 1.2e-38)
            err = (out[k] - x).abs()
            assert torch.all(err[normal] <= rel * x.abs()[normal])
            assert torch.all(err[~normal] <= 2.0**-25)


def test_fp16_saturates_instead_of_inf():
    _, out = roundtrip(make_codec("fp16"), {"w": torch.tensor([1e6, -1e6, 1.0])})
    assert out["w"].tolist() == [65504.0, -65504.0, 1.0]


# ------------------------------------------------------------------- top-k


def test_k_formula_is_decimal_exact_ceil():
    assert k_for(30, 0.1) == 3  # 0.1 * 30 is 3.0000000000000004 in binary
    assert k_for(31, 0.1) == 4 and k_for(1, 0.01) == 1 and k_for(0, 0.5) == 0 and k_for(7, 1.0) == 7


@FAST
@given(st.integers(1, 3000), st.floats(0.001, 1.0), st.integers(0, 2**31))
def test_topk_keeps_exactly_the_k_largest(n, ratio, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    _, out = roundtrip(make_codec("topk", ratio=ratio), {"w": x})
    y, k = out["w"], k_for(n, ratio)
    kept = y != 0
    assert int(kept.sum()) == k
    assert torch.equal(y[kept], x[kept])  # fp32 values travel exactly
    if k < n:
        assert x[kept].abs().min() >= x[~kept].abs().max()


@pytest.mark.parametrize("n", [1000, 50_000, 300_000])
def test_topk_indices_match_a_sort_reference(n):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    k = k_for(n, 0.05)
    ref = np.sort(np.argsort(-np.abs(x), kind="stable")[:k])
    np.testing.assert_array_equal(topk_indices(x, k), ref)


def test_topk_sampled_threshold_falls_back_when_the_sample_misleads():
    # The strided sample sees only huge values, so its threshold estimate is
    # far too high; the result must still be the exact top-k.
    n = 1 << 18
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32) * 1e-3
    x[::16] = 10 + np.arange(n // 16, dtype=np.float32)
    k = k_for(n, 0.1)
    ref = np.sort(np.argsort(-np.abs(x), kind="stable")[:k])
    np.testing.assert_array_equal(topk_indices(x, k), ref)


def test_topk_ties_and_zeros():
    assert topk_indices(np.ones(10, np.float32), 3).tolist() == [0, 1, 2]  # ties: lowest positions
    x = np.array([0, 2, 0, -1, 0, 0], np.float32)
    assert topk_indices(x, 4).tolist() == [1, 3]  # fewer nonzeros than k: never send a zero
    assert topk_indices(np.zeros(5, np.float32), 2).tolist() == []


# ------------------------------------------------------------------- rand-k


def test_randk_same_indices_for_same_seed_across_calls_and_clients():
    a, b = rand_delta(1), rand_delta(2)  # two clients, different data
    codec = make_codec("randk", ratio=0.2)
    supports = [{k: v != 0 for k, v in roundtrip(codec, d, seed=7)[1].items()} for d in (a, b, a)]
    for k in a:
        assert torch.equal(supports[0][k], supports[1][k]) and torch.equal(supports[0][k], supports[2][k])
    i1, i2 = randk_indices(10_000, 1000, 7, 0), randk_indices(10_000, 1000, 7, 0)
    np.testing.assert_array_equal(i1, i2)
    assert i1.size == 1000 and np.all(np.diff(i1) > 0) and 0 <= i1[0] and i1[-1] < 10_000
    assert not np.array_equal(i1, randk_indices(10_000, 1000, 8, 0))  # another round
    assert not np.array_equal(i1, randk_indices(10_000, 1000, 7, 1))  # another tensor


def test_randk_values_and_unbiased_rescale():
    x = torch.randn(500, generator=torch.Generator().manual_seed(3))
    idx = torch.from_numpy(randk_indices(500, 50, 11, 0))
    for unbiased, factor in ((False, 1.0), (True, 10.0)):
        codec = make_codec("randk", ratio=0.1, randk_unbiased=unbiased)
        _, out = roundtrip(codec, {"w": x}, seed=11)
        want = torch.zeros(500)
        want[idx] = x[idx] * factor
        assert torch.equal(out["w"], want)


def test_randk_subset_is_uniform():
    counts = np.zeros(12)
    for s in range(3000):
        counts[randk_indices(12, 4, s, 0)] += 1
    assert np.all(np.abs(counts / 1000 - 1) < 0.12)  # each position kept w.p. 1/3


# ------------------------------------------------------------------- ternary


def test_topk_ternary_matches_compeft_by_hand():
    x = torch.tensor([0.5, -2.0, 0.1, 3.0, -0.2, 0.0])
    codec = make_codec("topk+ternary", ratio=0.5, ternary_alpha=2.0)
    payload, out = roundtrip(codec, {"w": x})
    # ComPEFT's replace_noise_and_constant: drop all but the top 3 (set to 0), then
    # alpha * tensor.std() of [0.5, -2, 0, 3, 0, 0]: mean 0.25, squared deviations sum to
    # 0.0625 + 5.0625 + 0.0625 + 7.5625 + 0.0625 + 0.0625 = 12.875, / (6 - 1) = 2.575
    s = 2.0 * math.sqrt(2.575)
    assert s == pytest.approx(2.0 * statistics.stdev([0.5, -2.0, 0.0, 3.0, 0.0, 0.0]), rel=1e-12)
    np.testing.assert_allclose(out["w"].numpy(), [s, -s, 0, s, 0, 0], rtol=1e-6)
    # k = 3 kept at positions 0, 1, 3 -> bitmap 0b11010000; signs of (0.5, -2, 3) -> 0b01000000
    body = payload[HEADER:]
    assert body[:5] == struct.pack("<BI", 0, 3) and body[5] == 0xD0
    assert body[6:10] == struct.pack("<f", np.float32(s)) and body[10] == 0x40 and len(body) == 11


def test_topk_ternary_dense_scale_is_the_std_before_sparsification():
    x = torch.tensor([0.5, -2.0, 0.1, 3.0, -0.2, 0.0])
    codec = make_codec("topk+ternary", ratio=0.5, ternary_alpha=2.0, ternary_scale="dense")
    payload, out = roundtrip(codec, {"w": x})
    s = 2.0 * statistics.stdev([0.5, -2.0, 0.1, 3.0, -0.2, 0.0])  # ComPEFT's tv.std() (qlora/ties_utils.py)
    np.testing.assert_allclose(out["w"].numpy(), [s, -s, 0, s, 0, 0], rtol=1e-6)
    assert len(payload) == len(make_codec("topk+ternary", ratio=0.5).encode({"w": x}))  # same wire format
    with pytest.raises(ConfigError, match="ternary_scale"):
        make_codec("topk+ternary", ternary_scale="kept")


def test_topk_ternary_scale_on_a_gaussian_tensor_as_compeft_computes_it():
    # the figures: 64 x 384 of N(0, 0.01^2) at ratio 0.1 -> 0.0066 (sparse) vs 0.0100 (dense)
    x = 0.01 * torch.randn(64, 384, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    k = math.ceil(0.1 * x.numel())
    drop = torch.ones(x.numel(), dtype=torch.bool)
    drop[x.abs().flatten().topk(k).indices] = False
    sparsified = x.flatten().clone()
    sparsified[drop] = 0  # replace_noise_and_constant: tensor[mask] = 0, then tensor.std()
    want = {"sparse": float(sparsified.std()), "dense": float(x.std())}
    assert want["sparse"] == pytest.approx(0.0066, abs=1e-4) and want["dense"] == pytest.approx(0.0100, abs=1e-4)
    for scale, s in want.items():
        _, out = roundtrip(make_codec("topk+ternary", ratio=0.1, ternary_scale=scale), {"w": x.float()})
        got = out["w"].flatten()
        assert torch.equal(got != 0, ~drop)  # the same k entries kept
        np.testing.assert_allclose(got[~drop].abs().numpy(), s, rtol=1e-5)


def test_sign_by_hand_and_mean_magnitude_is_the_least_squares_scale():
    x = torch.tensor([0.5, -2.0, 0.1, 3.0, -0.2, 0.0, 1.0, -1.0, 4.0])
    payload, out = roundtrip(make_codec("sign"), {"w": x})
    s = sum(abs(v) for v in x.tolist()) / 9
    np.testing.assert_allclose(out["w"].numpy(), [s, -s, s, s, -s, s, s, -s, s], rtol=1e-6)
    # header + f32 scale + 2 sign bytes: signs 0,1,0,0,1,0,0,1 | 0 (+7 pad bits) = 0x49, 0x00
    assert payload[HEADER:] == struct.pack("<f", np.float32(s)) + bytes([0x49, 0x00])
    # for fixed signs, sum((x - c*sign x)^2) is minimised at c = mean|x|
    err = lambda c: float(((x - c * torch.where(x < 0, -1.0, 1.0)) ** 2).sum())  # noqa: E731
    assert err(s) < min(err(s * 0.95), err(s * 1.05))
    # per-block scales: blocks [0.5,-2,0.1,3], [-0.2,0,1,-1], [4]
    _, out = roundtrip(make_codec("sign", block_size=4), {"w": x})
    b = [5.6 / 4, 2.2 / 4, 4.0]
    np.testing.assert_allclose(out["w"].numpy(), [b[0], -b[0], b[0], b[0], -b[1], b[1], b[1], -b[1], b[2]], rtol=1e-6)


def test_sign_rms_scale_keeps_each_blocks_l2_norm_by_hand():
    x = torch.tensor([0.5, -2.0, 0.1, 3.0, -0.2, 0.0, 1.0, -1.0, 4.0])
    plain, _ = roundtrip(make_codec("sign", block_size=4), {"w": x})
    payload, out = roundtrip(make_codec("sign", block_size=4, sign_scale="rms"), {"w": x})
    # blocks [0.5,-2,0.1,3], [-0.2,0,1,-1], [4]: sqrt(mean of squares)
    b = [(13.26 / 4) ** 0.5, (2.04 / 4) ** 0.5, 4.0]
    np.testing.assert_allclose(out["w"].numpy(), [b[0], -b[0], b[0], b[0], -b[1], b[1], b[1], -b[1], b[2]], rtol=1e-6)
    for blk in (slice(0, 4), slice(4, 8), slice(8, 9)):
        np.testing.assert_allclose(out["w"][blk].norm().item(), x[blk].norm().item(), rtol=1e-6)
    assert len(payload) == len(plain)  # same wire format, other scales
    with pytest.raises(ConfigError, match="sign_scale"):
        make_codec("sign", sign_scale="l2")


def test_standalone_ternary_keeps_zeros_zero():
    x = torch.tensor([[0.5, 0.0], [-1.5, 0.25]])
    _, out = roundtrip(make_codec("ternary"), {"w": x})
    s = statistics.stdev([0.5, 0.0, -1.5, 0.25])
    np.testing.assert_allclose(out["w"].numpy(), [[s, 0], [-s, s]], rtol=1e-6)


# ------------------------------------------------------------------- wire sizes


LAYOUT_DELTA = rand_delta(5, shapes=((3, 5), (1000,), (7,), (4, 64)))
NS = [15, 1000, 7, 256]


def ceil_div(a, b):
    return -(-a // b)


@pytest.mark.parametrize(
    "name,block,per_tensor",
    [
        ("none", None, lambda n: 4 * n),
        ("fp16", None, lambda n: 2 * n),
        ("bf16", None, lambda n: 2 * n),
        ("int8", None, lambda n: 4 + n),
        ("int8", 64, lambda n: 4 * ceil_div(n, 64) + n),
        ("int4", None, lambda n: 4 + ceil_div(n, 2)),
        ("int4", 10, lambda n: 4 * ceil_div(n, 10) + ceil_div(n, 2)),
        ("randk", None, lambda n: 5 + 4 * ceil_div(n, 10)),
        ("randk+fp16", None, lambda n: 5 + 2 * ceil_div(n, 10)),
        ("randk+int8", 8, lambda n: 5 + 4 * ceil_div(ceil_div(n, 10), 8) + ceil_div(n, 10)),
        ("randk+int4", None, lambda n: 5 + 4 + ceil_div(ceil_div(n, 10), 2)),
        ("sign", None, lambda n: 4 + ceil_div(n, 8)),
        ("sign", 32, lambda n: 4 * ceil_div(n, 32) + ceil_div(n, 8)),
        ("randk+sign", None, lambda n: 5 + 4 + ceil_div(ceil_div(n, 10), 8)),
    ],
)
def test_layout_only_sizes_match_hand_formula(name, block, per_tensor):
    codec = make_codec(name, ratio=0.1, block_size=block)
    want = HEADER + sum(per_tensor(n) for n in NS)
    assert len(codec.encode(LAYOUT_DELTA, seed=1)) == want
    assert expected_size(codec, layout_of(LAYOUT_DELTA)) == want and codec.size_is_exact


def spaced(n: int, positions, big: float = 1.0) -> torch.Tensor:
    x = torch.linspace(1e-6, 2e-6, n)  # small, distinct, nonzero
    x[list(positions)] = big * torch.tensor([(-1) ** i * (1 + i / 1000) for i in range(len(positions))])
    return x


def test_topk_sizes_bitmap_and_varint_by_hand():
    delta = {
        "bitmap": spaced(15, [1, 8]),  # k = 2: varint 4+2 > bitmap 2
        "varint": spaced(1000, range(0, 1000, 10)),  # k = 100, gaps 0,9,9,...: 4 + 100 < bitmap 125
        "dense_k": spaced(80, range(0, 80, 10)),  # k = 8: varint 4+8 > bitmap 10
    }
    idx_bytes = {"bitmap": 2, "varint": 4 + 100, "dense_k": 10}
    ks = {"bitmap": 2, "varint": 100, "dense_k": 8}
    codec = make_codec("topk+ternary", ratio=0.1)
    payload = codec.encode(delta)
    # header + per tensor: (flag, k) + index bytes + f32 scale + ceil(k/8) sign bytes
    assert len(payload) == HEADER + sum(5 + idx_bytes[t] + 4 + ceil_div(ks[t], 8) for t in delta)
    assert len(payload) == expected_size(codec, layout_of(delta), delta)
    # chains share the one index section: only the value bytes change
    for name, vbytes in (
        ("topk", lambda k: 4 * k),
        ("topk+int8", lambda k: 4 + k),
        ("topk+int4", lambda k: 4 + ceil_div(k, 2)),
    ):
        assert len(make_codec(name, ratio=0.1).encode(delta)) == HEADER + sum(
            5 + idx_bytes[t] + vbytes(ks[t]) for t in delta
        )


def test_topk_multibyte_varint_size_by_hand():
    positions = range(500, 100_000, 1000)  # first gap 500, then 999: two-byte varints
    delta = {"w": spaced(100_000, positions)}
    codec = make_codec("topk+ternary", ratio=0.001)
    payload = codec.encode(delta)
    assert len(payload) == HEADER + 5 + (4 + 100 * 2) + 4 + ceil_div(100, 8)
    out = codec.decode(payload, layout_of(delta))["w"]
    assert torch.equal(out.nonzero().squeeze(1), torch.tensor(list(positions)))


@FAST
@given(deltas(max_n=2000), st.sampled_from(VALID_CODECS), st.sampled_from([0.01, 0.1, 0.5]))
def test_expected_size_is_exact_with_delta_and_an_upper_bound_without(delta, name, ratio):
    codec = make_codec(name, ratio=ratio, block_size=16 if "int" in name else None)
    payload = codec.encode(delta, seed=3)
    assert len(payload) == expected_size(codec, layout_of(delta), delta)
    bound = expected_size(codec, layout_of(delta))
    assert len(payload) <= bound and (len(payload) == bound or not codec.size_is_exact)


def test_varint_roundtrip_including_large_gaps():
    g = np.array([0, 1, 127, 128, 16383, 16384, 2**21, 2**28, 2**32 - 1], dtype=np.int64)
    buf = np.frombuffer(wire.varint_encode(g), np.uint8)
    assert buf.size == wire.varint_nbytes(g) == 1 + 1 + 1 + 2 + 2 + 3 + 4 + 5 + 5
    np.testing.assert_array_equal(wire.varint_decode(buf, g.size, "t"), g)


# ------------------------------------------------------------------- error feedback


@pytest.mark.parametrize("name", ["topk", "randk", "none", "fp16", "bf16", "int8", "int4", "topk+int8", "randk+fp16"])
def test_error_feedback_bookkeeping_is_exact(name):
    codec = make_codec(name, ratio=0.1, block_size=32)
    residual = None
    sent_total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in rand_delta(0).items()}
    true_total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in rand_delta(0).items()}
    for rnd in range(3):
        delta = rand_delta(rnd)
        comp = compensate(delta, residual)
        decoded = codec.decode(codec.encode(comp, seed=rnd), layout_of(comp), seed=rnd)
        residual = residual_after(comp, decoded)
        for k in delta:
            assert torch.equal(decoded[k] + residual[k], comp[k])
            sent_total[k] += decoded[k].double()
            true_total[k] += delta[k].double()
    for k in sent_total:  # nothing lost, only delayed: sent + residual == sum of deltas
        torch.testing.assert_close(sent_total[k] + residual[k].double(), true_total[k], rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["topk+ternary", "sign"])
def test_error_feedback_ternary_within_one_rounding(name):
    codec = make_codec(name, ratio=0.1)
    comp = compensate(rand_delta(0), {})
    decoded = codec.decode(codec.encode(comp), layout_of(comp))
    residual = residual_after(comp, decoded)
    for k in comp:
        err = (decoded[k] + residual[k] - comp[k]).abs()
        assert torch.all(err <= torch.finfo(torch.float32).eps * residual[k].abs())


def test_compensate_without_residual_returns_delta():
    d = rand_delta(0)
    for r in (None, {}):
        out = compensate(d, r)
        assert out is not d and all(out[k] is d[k] for k in d)
    with pytest.raises(ValueError):
        compensate(d, {"other": torch.zeros(1)})


# ------------------------------------------------------------------- malformed payloads


def good(name="topk+ternary", **kw):
    codec = make_codec(name, **kw)
    delta = rand_delta(4)
    return codec, codec.encode(delta, seed=9), layout_of(delta)


@pytest.mark.parametrize("name", ["none", "int4", "topk+ternary", "randk+int8", "ternary"])
def test_every_truncation_and_any_trailing_byte_is_rejected(name):
    codec, payload, layout = good(name, block_size=16 if "int" in name else None)
    cuts = sorted(set(range(0, 64)) | set(range(0, len(payload), max(1, len(payload) // 97))))
    for cut in cuts:
        if cut < len(payload):
            with pytest.raises(PayloadError, match="truncated|wrong length|trailing|layout|bitmap|varint"):
                codec.decode(payload[:cut], layout, seed=9)
    with pytest.raises(PayloadError, match="trailing"):
        codec.decode(payload + b"\0", layout, seed=9)


def patch(payload: bytes, offset: int, data: bytes) -> bytes:
    return payload[:offset] + data + payload[offset + len(data) :]


def test_header_errors():
    codec, p, layout = good()
    cases = {
        "magic": patch(p, 0, b"\x00"),
        "version": patch(p, 1, b"\x07"),
        "unknown codec id": patch(p, 2, b"\xff"),
        r"encoded with codec 'topk\+int8'": patch(p, 2, bytes([0x23])),
        "flags": patch(p, 3, b"\x01"),
        "block size": patch(p, 12, struct.pack("<I", 64)),
        "seed tag": patch(p, 16, b"\x01"),
    }
    for msg, bad in cases.items():
        with pytest.raises(PayloadError, match=msg):
            codec.decode(bad, layout, seed=9)
    with pytest.raises(PayloadError, match="must be bytes"):
        codec.decode("not bytes", layout)  # type: ignore[arg-type]


def test_layout_mismatch_count_shape_order():
    codec, p, layout = good()
    keys = list(layout)
    with pytest.raises(PayloadError, match="payload has 4 tensors, layout has 3"):
        codec.decode(p, {k: layout[k] for k in keys[:3]})
    reshaped = dict(layout)
    reshaped[keys[0]] = (5, 3)  # same numel, other shape
    with pytest.raises(PayloadError, match="layout mismatch"):
        codec.decode(p, reshaped)
    with pytest.raises(PayloadError, match="layout mismatch"):
        codec.decode(p, {k: layout[k] for k in reversed(keys)})


def test_randk_seed_mismatch():
    codec, p, layout = good("randk+fp16")
    codec.decode(p, layout, seed=9)
    with pytest.raises(PayloadError, match="seed mismatch"):
        codec.decode(p, layout, seed=10)
    first = next(iter(layout))
    for seed in (-1, 2**64 + 5):  # any int works; only its low 64 bits matter
        s1 = roundtrip(codec, rand_delta(4), seed=seed)[1][first] != 0
        s2 = roundtrip(codec, rand_delta(6), seed=seed)[1][first] != 0
        assert torch.equal(s1, s2) and int(s1.sum()) == k_for(15, 0.1)


def single(name, x, **kw):
    codec = make_codec(name, **kw)
    return codec, codec.encode({"w": x}), {"w": tuple(x.shape)}


def test_index_out_of_range_and_bad_bitmaps():
    # varint: k = 2 gaps (0, 9) in n = 100 -> change the second gap to 99 -> index 100 >= n
    x = torch.zeros(100)
    x[0], x[10] = 1.0, -1.0
    codec, p, layout = single("topk", x, ratio=0.02)
    assert p[HEADER] == wire.INDEX_VARINT and p[HEADER + 5 : HEADER + 9] == struct.pack("<I", 2)
    with pytest.raises(PayloadError, match="out of range"):
        codec.decode(patch(p, HEADER + 10, bytes([99])), layout)
    with pytest.raises(PayloadError, match="non-canonical"):  # 0x80 0x00 spells 0 in two bytes
        codec.decode(
            patch(p, HEADER + 5, struct.pack("<I", 3))[: HEADER + 9] + bytes([0x80, 0x00, 9]) + p[HEADER + 11 :], layout
        )
    # bitmap: n = 6 -> 2 padding bits must be zero; popcount must equal k
    codec, p, layout = single("topk", torch.tensor([1.0, 2, 3, 4, 5, 6]), ratio=0.5)
    assert p[HEADER] == wire.INDEX_BITMAP
    with pytest.raises(PayloadError, match="padding"):
        codec.decode(patch(p, HEADER + 5, bytes([p[HEADER + 5] | 0x01])), layout)
    with pytest.raises(PayloadError, match="marks 4 positions"):
        codec.decode(patch(p, HEADER + 5, bytes([p[HEADER + 5] | 0x80])), layout)
    with pytest.raises(PayloadError, match="exceeds"):
        codec.decode(patch(p, HEADER + 1, struct.pack("<I", 7)), layout)
    with pytest.raises(PayloadError, match="index flag"):
        codec.decode(patch(p, HEADER, b"\x09"), layout)
    with pytest.raises(PayloadError, match="seeded index flag"):
        codec.decode(patch(p, HEADER, b"\x02"), layout)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_non_finite_or_negative_scales(bad):
    x = torch.tensor([1.0, -2.0, 3.0, 0.5])
    for name, offset in (("int8", HEADER), ("topk+ternary", HEADER + 5 + 1)):
        codec, p, layout = single(name, x, ratio=0.5)
        with pytest.raises(PayloadError, match="scale"):
            codec.decode(patch(p, offset, struct.pack("<f", bad)), layout)


def test_out_of_range_quantized_values_and_non_finite_floats():
    x = torch.tensor([1.0, -2.0, 3.0])
    codec, p, layout = single("int8", x)
    with pytest.raises(PayloadError, match="-128"):
        codec.decode(patch(p, HEADER + 4, b"\x80"), layout)
    codec, p, layout = single("int4", x)
    with pytest.raises(PayloadError, match="-8"):
        codec.decode(patch(p, HEADER + 4, b"\x08"), layout)
    with pytest.raises(PayloadError, match="pad nibble"):
        codec.decode(patch(p, HEADER + 5, bytes([p[HEADER + 5] | 0x01])), layout)
    codec, p, layout = single("fp16", x)
    with pytest.raises(PayloadError, match="non-finite"):
        codec.decode(patch(p, HEADER, struct.pack("<e", float("inf"))), layout)
    codec, p, layout = single("none", x)
    with pytest.raises(PayloadError, match="non-finite"):
        codec.decode(patch(p, HEADER + 4, struct.pack("<f", float("nan"))), layout)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["topk+ternary", "topk+int4", "randk+int8", "ternary", "bf16"]), st.data())
def test_fuzzed_payloads_decode_or_raise_payload_error(name, data):
    codec = make_codec(name, ratio=0.3, block_size=4 if "int" in name else None)
    delta = {"a": torch.randn(3, 7, generator=torch.Generator().manual_seed(0)), "b": torch.randn(40)}
    p = bytearray(codec.encode(delta, seed=1))
    for _ in range(data.draw(st.integers(1, 3))):
        p[data.draw(st.integers(HEADER, len(p) - 1))] = data.draw(st.integers(0, 255))
    try:
        out = codec.decode(bytes(p), layout_of(delta), seed=1)
    except PayloadError:
        return
    assert all(torch.isfinite(v).all() for v in out.values())


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError, match="non-finite"):
        make_codec("topk").encode({"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(TypeError, match="floating-point"):
        make_codec("none").encode({"w": torch.tensor([1, 2])})


# ------------------------------------------------------------------- config


def test_config_defaults_and_build():
    c = CompressionConfig()
    assert build_codec(c).name == "none" and build_codec(c, "downlink").name == "none"
    c = CompressionConfig.from_dict(
        {"codec": "topk+ternary", "downlink": "randk+fp16", "ratio": 0.05, "randk_unbiased": True}
    )
    up, down = build_codec(c), build_codec(c, "downlink")
    assert (up.name, down.name, up.rescale, down.rescale) == ("topk+ternary", "randk+fp16", False, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.ratio = 0.5  # type: ignore[misc]
    with pytest.raises(ConfigError, match="direction"):
        build_codec(c, "sideways")  # type: ignore[arg-type]


def test_config_rejects_unknown_keys_naming_them():
    with pytest.raises(ConfigError, match=r"compression\.bitz: unknown key \(known: .*codec"):
        CompressionConfig.from_dict({"codec": "int8", "bitz": 4})


@pytest.mark.parametrize(
    "field,value",
    [
        ("codec", "topk+foo"),
        ("codec", "randk+ternary"),
        ("codec", "ternary+topk"),
        ("codec", 3),
        ("downlink", "gzip"),
        ("ratio", 0),
        ("ratio", 1.5),
        ("ratio", float("nan")),
        ("ratio", "0.1"),
        ("ratio", True),
        ("block_size", 0),
        ("block_size", 2.5),
        ("block_size", True),
        ("ternary_alpha", 0.0),
        ("ternary_alpha", float("inf")),
        ("ternary_scale", "kept"),
        ("error_feedback", 1),
        ("randk_unbiased", "yes"),
    ],
)
def test_config_bad_values_name_field_and_value(field, value):
    with pytest.raises(ConfigError) as info:
        CompressionConfig.from_dict({field: value})
    assert field in str(info.value) and repr(value) in str(info.value)


def test_config_unknown_codec_lists_valid_ones_and_all_errors_at_once():
    with pytest.raises(ConfigError) as info:
        CompressionConfig(codec="topk+int3", ratio=2.0, block_size=-1)
    msg = str(info.value)
    assert all(name in msg for name in VALID_CODECS)
    assert "ratio" in msg and "block_size" in msg
    with pytest.raises(ConfigError, match="randk_unbiased"):
        CompressionConfig(codec="topk", randk_unbiased=True)
    with pytest.raises(ConfigError, match="unknown codec"):
        make_codec("int3")
    with pytest.raises(ConfigError, match="ratio"):
        make_codec("topk", ratio=0.0)  # the low-level builder validates too


def test_every_valid_codec_builds_from_config():
    for name in VALID_CODECS:
        blocks = {"block_size": 8} if name.split("+")[-1] in ("int8", "int4", "sign") else {}
        assert build_codec(CompressionConfig(codec=name, **blocks)).name == name
    assert "randk+ternary" not in VALID_CODECS and math.isfinite(CompressionConfig().ratio)


@pytest.mark.parametrize(
    "given,key",
    [
        ({"codec": "int8", "ratio": 0.5}, "ratio"),
        ({"block_size": 64}, "block_size"),
        ({"codec": "topk+fp16", "block_size": 64}, "block_size"),
        ({"codec": "sign", "ternary_alpha": 2.0}, "ternary_alpha"),
        ({"codec": "sign", "ternary_scale": "dense"}, "ternary_scale"),
        ({"codec": "int8", "downlink": "int8", "sign_scale": "rms"}, "sign_scale"),
        ({"codec": "topk", "randk_unbiased": True}, "randk_unbiased"),
        ({"error_feedback": True}, "error_feedback"),
        ({"codec": "sign", "small_numel": 100}, "small_numel"),
    ],
)
def test_config_refuses_a_setting_no_codec_in_use_reads(given, key):
    with pytest.raises(ConfigError) as info:
        CompressionConfig(**given)
    (line,) = str(info.value).splitlines()[1:]  # that one problem, naming the key and the codecs in use
    assert line.strip().startswith(f"compression.{key}:") and repr(given[key]) in line
    assert f"compression.codec = {given.get('codec', 'none')!r}" in line or key in ("error_feedback", "small_numel")


@pytest.mark.parametrize(
    "given",
    [
        {"codec": "int8", "downlink": "randk", "ratio": 0.5},  # the downlink reads it
        {"codec": "topk+ternary", "ternary_alpha": 2.0, "ternary_scale": "dense", "ratio": 0.05},
        {"codec": "topk", "small_codec": "int4", "block_size": 64},  # the small tensors' codec reads it
        {"codec": "sign", "small_codec": "int4", "sign_scale": "rms", "small_numel": 100},
        {"codec": "int8", "ratio": 0.1, "sign_scale": "mean_abs"},  # defaults change nothing: a saved config loads
    ],
)
def test_config_accepts_a_setting_a_codec_in_use_reads(given):
    assert CompressionConfig(**given).codec == given["codec"]


# ------------------------------------------------------------- split by tensor size


def test_split_codec_sends_small_tensors_through_their_own_codec_by_hand():
    g = torch.Generator().manual_seed(0)
    delta = {
        "lora_A": torch.randn(8, 384, generator=g),
        "head.weight": torch.randn(2, 384, generator=g),
        "lora_B": torch.randn(384, 8, generator=g),
        "head.bias": torch.randn(2, generator=g),
    }
    split = build_codec(CompressionConfig(codec="sign", sign_scale="rms", small_codec="none"))
    payload, out = roundtrip(split, delta)
    big = {k: delta[k] for k in ("lora_A", "lora_B")}
    small = {k: delta[k] for k in ("head.weight", "head.bias")}
    sign, fp32 = make_codec("sign", sign_scale="rms"), make_codec("none")
    head = sign.encode(big)
    assert payload == struct.pack("<I", len(head)) + head + fp32.encode(small)
    # u32 length + (header + per tensor: f32 scale + 3072 sign bits) + (header + 4 bytes per value)
    assert len(payload) == split.wire_size(layout_of(delta)) == 4 + (HEADER + 2 * (4 + 384)) + (HEADER + 4 * 770)
    assert list(out) == list(delta)  # the sender's order
    for k in small:
        assert torch.equal(out[k], small[k])
    for k, v in sign.decode(head, layout_of(big)).items():
        assert torch.equal(out[k], v)
    # only large tensors: an empty small part; the threshold is configurable
    only_big = build_codec(CompressionConfig(codec="sign", small_codec="int4", small_numel=3))
    payload, out = roundtrip(only_big, {"w": delta["lora_A"]})
    assert len(payload) == 4 + HEADER + 4 + 384


def test_split_codec_rejects_malformed_payloads():
    delta = {"w": torch.randn(2000), "b": torch.randn(3)}
    split = build_codec(CompressionConfig(codec="sign", small_codec="int8"))
    payload = split.encode(delta)
    layout = layout_of(delta)
    with pytest.raises(PayloadError, match="truncated"):
        split.decode(payload[:2], layout)
    with pytest.raises(PayloadError, match="truncated"):
        split.decode(struct.pack("<I", len(payload)) + payload[4:], layout)  # length past the end
    with pytest.raises(PayloadError):
        split.decode(payload[:-1], layout)
    with pytest.raises(PayloadError, match="no small tensors"):
        split.decode(payload, {"w": (2000,)})
    other = build_codec(CompressionConfig(codec="sign", small_codec="fp16"))
    with pytest.raises(PayloadError, match="codec"):
        other.decode(payload, layout)


def test_small_codec_config_is_validated():
    with pytest.raises(ConfigError, match="small_codec"):
        CompressionConfig(codec="sign", small_codec="int3")
    with pytest.raises(ConfigError, match="small_codec"):
        CompressionConfig(codec="none", small_codec="int8")
    with pytest.raises(ConfigError, match="small_numel"):
        CompressionConfig(codec="sign", small_codec="int8", small_numel=0)
