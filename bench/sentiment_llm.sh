#!/usr/bin/env bash
# SmolLM2 label-word sentiment (simulations/configs/smollm2-sentiment.toml: the demo's data and
# silos, the template "Review: {text}\nSentiment:" and the words " negative" / " positive") under
# zeroth-order training and differential privacy, next to gradient LoRA on the same model and
# objective. Pass row names to run a subset: bench/sentiment_llm.sh zo-sb
# The DP rows on IMDB (the cross-silo DP table): SETS="data.dataset=imdb data.max_test_examples=1000"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results/sentiment-llm}
# FedKSeed on the label-word objective: the search space is the Fed-SB core (adapter.method =
# "lora-sb": an r x r matrix between fixed factors on q/v, 3,840 coordinates at r 8) instead of
# LoRA's 460,800 (a two-point estimate's variance grows with the dimension); 40 ZO steps of batch 16
# a client-round, K = 4096 seeds, eps 1e-2 (MeZO's LoRA setting), lr 1e-1 (the expected step is lr x the
# gradient, whose coordinates are ~6e-3 here: 3e-2 barely moved the core in 4 rounds, 3e-1 diverged in a
# centralized probe), 8 rounds (ZO steps are slow here: two forward passes each), bf16 forward passes
ZO="train.mode=zo,train.lr_schedule=constant,adapter.method=lora-sb,zo.local_steps=40,zo.lr=1e-1,zo.eps=1e-2,zo.num_seeds=4096,federation.rounds=8"
# Sample-level DP (opacus): all 10 silos every round (averaging 10 noisy updates), 2 rounds of 4
# steps at batch 32, the Fed-SB core (3,840 noised coordinates + nothing else: label words need no
# head), AdamW lr 5e-3 (the core needs a larger step than LoRA), clip 1, delta 1e-5
ALL10="federation.fraction_train=1.0,federation.min_train_clients=10,federation.rounds=2,train.local_steps=4,train.batch_size=32,adapter.method=lora-sb,train.lr=5e-3"
SDP="privacy.mode=sample,privacy.max_grad_norm=1.0,privacy.delta=1e-5"
# logical batches of 64 (two physical batches of 32): at 8 steps opacus' z grows far slower than the
# batch (0.40 -> 0.44 on the largest silo at epsilon 8), so the noise on each mean gradient nearly halves
B64="train.batch_size=64,train.physical_batch_size=32"
# Fed-SB factors from the gradient on public reviews (adapter.sb_factors = "gradient"): the other
# bundled review set than the run's (PUBLIC=rotten_tomatoes for the IMDB rows), 128 of them
PUBLIC=${PUBLIC:-imdb}
GF="adapter.sb_factors=gradient,adapter.sb_public_data=$PUBLIC,adapter.sb_public_examples=128"
# the gf2 rows started from an adapter trained on public data (WARM=RUN/adapter, adapter.init_from),
# round 0 evaluated on every held-out example; WARM_LR: their AdamW step (default 1e-3)
WARMED="adapter.init_from=${WARM:-},federation.round_eval_examples=0,train.lr=${WARM_LR:-1e-3}"
INT4="compression.codec=int4,compression.downlink=int4,compression.downlink_catchup=delta"
INT8="compression.codec=int8,compression.downlink=int8,compression.downlink_catchup=delta"
declare -A ROWS=(
  [lora]=""
  [lora-sb]="adapter.method=lora-sb,train.lr=5e-3"
  [zo-sb]="$ZO"
  [dp-nonprivate]="$ALL10"
  [dp-eps8]="$ALL10,$SDP,privacy.target_epsilon=8"
  [dp-eps3]="$ALL10,$SDP,privacy.target_epsilon=3"
  [dp-eps1]="$ALL10,$SDP,privacy.target_epsilon=1"
  # per-example clipping without noise (no privacy: epsilon is infinite): what clipping alone costs
  [dp-clip-only]="$ALL10,$SDP,privacy.noise_multiplier=0.0"
  [dp-gf-nonprivate]="$ALL10,$GF"
  [dp-gf-eps8]="$ALL10,$GF,$SDP,privacy.target_epsilon=8"
  [dp-gf2-nonprivate]="$ALL10,$GF,adapter.r=2,train.lr=2e-3"
  [dp-gf2-eps8]="$ALL10,$GF,adapter.r=2,train.lr=2e-3,$SDP,privacy.target_epsilon=8"
  # the same at AdamW 1e-3: under DP every AdamW step is full-size on the noise (measured: the
  # smaller step costs the clean run 1.7 points and the noisy one 0.7)
  [dp-gf2-lr1-nonprivate]="$ALL10,$GF,adapter.r=2,train.lr=1e-3"
  [dp-gf2-lr1-eps8]="$ALL10,$GF,adapter.r=2,train.lr=1e-3,$SDP,privacy.target_epsilon=8"
  # the same started from an adapter trained on public reviews (WARM: the adapter directory of
  # `fedtune centralized` on rotten_tomatoes with the gf2 adapter settings; the core and its factors
  # come from there); round 0 evaluates that start on every held-out review, so the rows also say
  # what the public data alone gives
  [dp-gf2-warm-nonprivate]="$ALL10,adapter.r=2,$WARMED"
  [dp-gf2-warm-eps8]="$ALL10,adapter.r=2,$WARMED,$SDP,privacy.target_epsilon=8"
  [lora-sb-gf2]="adapter.method=lora-sb,train.lr=2e-3,adapter.r=2,$GF"
  # communication both ways: LoRA rank 1 (alpha 2, the same alpha / r as the lora row) coded int4 up
  # and down, a returning silo sent one payload of (global - the copy the server keeps for it)
  [lora-r1-int4]="adapter.r=1,adapter.alpha=2,$INT4"
  # the Fed-SB core at r 8 between public-gradient factors, int8 both ways the same way
  [lora-sb-gf8-int8]="adapter.method=lora-sb,train.lr=3e-3,$GF,$INT8"
  [dp-b64-nonprivate]="$ALL10,$B64"
  [dp-b64-eps8]="$ALL10,$B64,$SDP,privacy.target_epsilon=8"
)
ORDER=(lora lora-sb zo-sb dp-nonprivate dp-eps8 dp-eps3 dp-eps1 dp-clip-only dp-b64-nonprivate dp-b64-eps8)
[ $# -gt 0 ] && ORDER=("$@")
for r in "${ORDER[@]}"; do
  if [[ $r == *-warm-* && -z ${WARM:-} ]]; then
    echo "row $r: set WARM to the adapter directory of a run on public data (RUN/adapter)" >&2
    exit 2
  fi
done
args=()
for r in "${ORDER[@]}"; do args+=(--row "$r:${ROWS[$r]}"); done
for o in ${SETS:-}; do args+=(--set "$o"); done
$PY bench/table.py --config simulations/configs/smollm2-sentiment.toml --out "$OUT" "${args[@]}"
