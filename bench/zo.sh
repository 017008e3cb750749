#!/usr/bin/env bash
# Zeroth-order table on the demo task (simulations/configs/default.toml, same rounds and sampled
# clients for every row): FedKSeed zeroth-order training (K = 4096 seeds; clients send
# (seed index, scalar) pairs, the server sends the K accumulated scalars) with the adapter scope
# (LoRA + head) and the full-parameter scope (all 22.7M MiniLM weights), next to gradient-based
# LoRA FedAvg. Pass row names to run a subset: bench/zo.sh zo-adapter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results/zo}
ZO="train.mode=zo,train.lr_schedule=constant,zo.num_seeds=4096,zo.local_steps=50,zo.eps=1e-3"
declare -A ROWS=(
  [lora-fedavg]=""
  [zo-adapter]="$ZO,zo.scope=adapter,zo.lr=5e-3"
  [zo-adapter-clip5]="$ZO,zo.scope=adapter,zo.lr=5e-3,zo.grad_clip=5"
  [lora-fedavg-mean]="model.pooling=mean"
  [zo-adapter-mean]="$ZO,zo.scope=adapter,zo.lr=5e-3,zo.grad_clip=5,model.pooling=mean"
  [zo-full-mean]="$ZO,zo.scope=full,zo.lr=${ZO_FULL_LR:-1e-5},zo.grad_clip=5,model.pooling=mean"
  [zo-full]="$ZO,zo.scope=full,zo.lr=${ZO_FULL_LR:-1e-5},zo.grad_clip=5"
  # the head starts as the nearest class mean of every client's pooled embeddings (adapter.head_init);
  # the exchange's bytes are in round 0 and in the totals the per-client-round figures divide
  [lora-fedavg-mean-proto]="model.pooling=mean,adapter.head_init=prototypes"
  [zo-adapter-mean-proto]="$ZO,zo.scope=adapter,zo.lr=5e-3,zo.grad_clip=5,model.pooling=mean,adapter.head_init=prototypes"
)
ORDER=(lora-fedavg zo-adapter zo-adapter-clip5 lora-fedavg-mean zo-adapter-mean zo-full zo-full-mean
  lora-fedavg-mean-proto zo-adapter-mean-proto)
[ $# -gt 0 ] && ORDER=("$@")
args=()
for r in "${ORDER[@]}"; do args+=(--row "$r:${ROWS[$r]}"); done
for o in ${SETS:-}; do args+=(--set "$o"); done  # e.g. SETS="federation.eval_every=6" (fewer evaluations, same training)
$PY bench/table.py --config simulations/configs/default.toml --out "$OUT" "${args[@]}"
