#!/usr/bin/env bash
# Compression table: the demo task (simulations/configs/default.toml: MiniLM + LoRA, Rotten Tomatoes,
# 10 clients, Dirichlet 0.5), same config, seeds and rounds for every row; only the uplink codec
# differs. Pass row names to run a subset: bench/compression.sh none-fp32 sign+EF
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results/compression}
# Fed-SB core + prototype head (rows sb-proto*, sb12-proto-int8 = simulations/configs/compressed.toml)
SBP="adapter.method=lora-sb,adapter.sb_factors=gradient,adapter.sb_public_data=imdb,adapter.sb_public_examples=128,model.pooling=mean,adapter.head_init=prototypes,train.lr=2e-3"
declare -A ROWS=(
  [none-fp32]=""
  [fp16]="compression.codec=fp16"
  [int8]="compression.codec=int8"
  [int4]="compression.codec=int4"
  [topk10]="compression.codec=topk,compression.ratio=0.1"
  # ComPEFT's ternary scale: alpha x std of the sparsified tensor (the default, ternary_scale=sparse)
  [topk10+ternary]="compression.codec=topk+ternary,compression.ratio=0.1"
  [topk10+ternary+EF]="compression.codec=topk+ternary,compression.ratio=0.1,compression.error_feedback=true"
  [topk5+ternary+EF]="compression.codec=topk+ternary,compression.ratio=0.05,compression.error_feedback=true"
  # alpha x std of the tensor before sparsification (ternary_scale=dense)
  [topk10+ternary-dense]="compression.codec=topk+ternary,compression.ratio=0.1,compression.ternary_scale=dense"
  [topk10+ternary+EF-dense]="compression.codec=topk+ternary,compression.ratio=0.1,compression.error_feedback=true,compression.ternary_scale=dense"
  [topk5+ternary+EF-dense]="compression.codec=topk+ternary,compression.ratio=0.05,compression.error_feedback=true,compression.ternary_scale=dense"
  [sign]="compression.codec=sign"
  [sign+EF]="compression.codec=sign,compression.error_feedback=true"
  [sign-b512]="compression.codec=sign,compression.block_size=512"
  # rms scale: each tensor's decoded update keeps its L2 norm (mean|v| shrinks it: a shorter step per round)
  [sign-rms]="compression.codec=sign,compression.sign_scale=rms"
  [sign-rms-b512]="compression.codec=sign,compression.sign_scale=rms,compression.block_size=512"
  # the task head (768 + 2 values, under small_numel = 1024) in int4, the LoRA matrices 1-bit
  [sign-rms-head4]="compression.codec=sign,compression.sign_scale=rms,compression.small_codec=int4"
  [sign-rms+EF]="compression.codec=sign,compression.sign_scale=rms,compression.error_feedback=true"
  # and the broadcast 1-bit too: a client gets the rms-sign payloads of the rounds it missed
  # (from the seeded initial adapter in its first round), or the full adapter when smaller
  [sign-rms-head4-down-sign]="compression.codec=sign,compression.sign_scale=rms,compression.small_codec=int4,compression.downlink=sign"
  # one payload down a client-round whatever the rounds it missed: the global minus the copy the server
  # keeps for that node (compression.downlink_catchup = "delta")
  [sign-rms-head4-down-delta]="compression.codec=sign,compression.sign_scale=rms,compression.small_codec=int4,compression.downlink=sign,compression.downlink_catchup=delta"
  # fewer coordinates: LoRA rank 2 (19,202 values with the head), uncompressed
  [r2-fp32]="adapter.r=2,adapter.alpha=4"
  # few coordinates both ways: the Fed-SB core (r x r between fixed factors from the gradient on 128
  # public IMDB reviews) over mean-pooled MiniLM, the head from the silos' class prototypes
  [sb-proto]="$SBP"
  # ... coded int8 up and down, a returning client sent one int8 payload of the global minus its copy
  [sb-proto-int8]="$SBP,compression.codec=int8,compression.downlink=int8,compression.downlink_catchup=delta"
  # ... at r 12 (144 values a core), factors from 512 public reviews: simulations/configs/compressed.toml
  [sb12-proto-int8]="$SBP,adapter.r=12,adapter.alpha=24,adapter.sb_public_examples=512,compression.codec=int8,compression.downlink=int8,compression.downlink_catchup=delta"
  # SecAgg+ (the server sees only the masked sum): masked values packed at log2(modulus_range) bits
  [secagg]="aggregation.secure=secagg+"
  # every client masks the same random-k coordinates, drawn from the round seed; n/k-scaled
  [secagg-randk25]="aggregation.secure=secagg+,compression.codec=randk,compression.ratio=0.25,compression.randk_unbiased=true"
  [secagg-randk25-biased]="aggregation.secure=secagg+,compression.codec=randk,compression.ratio=0.25"
)
ORDER=(none-fp32 fp16 int8 int4 topk10 topk10+ternary topk10+ternary+EF topk5+ternary+EF topk10+ternary-dense topk10+ternary+EF-dense topk5+ternary+EF-dense sign sign+EF sign-b512 sign-rms sign-rms-b512 sign-rms+EF sign-rms-head4 sign-rms-head4-down-sign sign-rms-head4-down-delta r2-fp32 sb-proto sb-proto-int8 sb12-proto-int8 secagg secagg-randk25 secagg-randk25-biased)
[ $# -gt 0 ] && ORDER=("$@")
args=()
for r in "${ORDER[@]}"; do args+=(--row "$r:${ROWS[$r]}"); done
for o in ${SETS:-}; do args+=(--set "$o"); done  # e.g. SETS="federation.eval_every=6" (fewer evaluations, same training)
$PY bench/table.py --config simulations/configs/default.toml --out "$OUT" "${args[@]}"
