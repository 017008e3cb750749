"""Encode/decode speed and size of the delta codecs on 10M-element deltas.

    python bench/bench_codec_speed.py                  # all codecs, 1 thread
    python bench/bench_codec_speed.py --codecs topk+ternary int8 --repeats 5
    python bench/bench_codec_speed.py --codecs sign --sign-scale rms --small-codec int4

Two layouts of 10M float32 elements: one 10M tensor and 100 tensors of 100k.
Times are the best of ``--repeats`` runs (the machine is shared). The target
is encode + decode <= 0.3 s for ``topk+ternary`` and ``int8``; ``ratio`` is
payload bytes over dense fp32 bytes. With ``--small-codec`` each layout also holds a
768-value head tensor, sent through that codec (`fedtune.compression.split`).
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from fedtune.compression import VALID_CODECS, CompressionConfig, build_codec, layout_of
from fedtune.compression.values import Sign, Ternary

TARGETS = {"topk+ternary": 0.3, "int8": 0.3}
DEFAULT = [
    "none",
    "fp16",
    "bf16",
    "int8",
    "int4",
    "ternary",
    "topk",
    "topk+ternary",
    "topk+int8",
    "topk+int4",
    "randk+fp16",
]


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codecs", nargs="+", default=DEFAULT, choices=VALID_CODECS, metavar="CODEC")
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--sign-scale", default="mean_abs", choices=Sign.SCALES)
    ap.add_argument("--ternary-scale", default="sparse", choices=Ternary.SCALES)
    ap.add_argument("--small-codec", default="same", choices=["same", *VALID_CODECS])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    layouts = {
        "1x10M": {"w": torch.randn(10_000_000, generator=g) * 1e-3},
        "100x100k": {f"layer.{i}.lora_A.weight": torch.randn(100, 1000, generator=g) * 1e-3 for i in range(100)},
    }
    if args.small_codec != "same":
        for delta in layouts.values():
            delta["classifier.weight"] = torch.randn(2, 384, generator=g) * 1e-3
    print(
        f"threads={args.threads} ratio={args.ratio} block_size={args.block_size} sign_scale={args.sign_scale} "
        f"ternary_scale={args.ternary_scale} small_codec={args.small_codec} best of {args.repeats}"
    )
    head = f"{'codec':<14}{'layout':<10}{'elements':>11}{'encode s':>10}{'decode s':>10}{'total s':>9}{'bytes':>12}{'ratio':>8}"
    print(head)
    print("-" * len(head))
    for name in args.codecs:
        if name == "none" and args.small_codec != "same":
            continue  # a split needs a compressing codec for the large tensors
        codec = build_codec(
            CompressionConfig(
                codec=name,
                ratio=args.ratio,
                block_size=args.block_size,
                sign_scale=args.sign_scale,
                ternary_scale=args.ternary_scale,
                small_codec=args.small_codec,
            )
        )
        for lname, delta in layouts.items():
            layout = layout_of(delta)
            n = sum(v.numel() for v in delta.values())
            t_enc, payload = best_of(partial(codec.encode, delta, seed=1), args.repeats)
            t_dec, _ = best_of(partial(codec.decode, payload, layout, seed=1), args.repeats)
            total = t_enc + t_dec
            mark = ""
            if name in TARGETS:
                mark = "  ok" if total <= TARGETS[name] else f"  OVER {TARGETS[name]} s"
            print(
                f"{name:<14}{lname:<10}{n:>11,}{t_enc:>10.3f}{t_dec:>10.3f}{total:>9.3f}"
                f"{len(payload):>12,}{len(payload) / (4 * n):>8.4f}{mark}"
            )


if __name__ == "__main__":
    main()
