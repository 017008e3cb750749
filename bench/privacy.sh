#!/usr/bin/env bash
# Issue 4 table on the demo task (simulations/configs/default.toml): sample-level DP-SGD (opacus)
# at epsilon 1, 3, 8 (delta 1e-5; z calibrated by opacus for the planned rounds x local steps)
# next to the non-private run; client-level DP-FedAvg with 100 simulated clients, 10 per round,
# at two noise levels next to its own non-private 100-client run (delta 1e-3 < 1/clients;
# 12 rounds of 10 local steps to fit the CPU budget; IID: Dirichlet(0.5) leaves some of 100 silos empty).
# Pass row names to run a subset: bench/privacy.sh sample-eps8
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results/privacy}
C100="data.partition=iid,federation.num_clients=100,federation.fraction_train=0.1,train.local_steps=10,federation.rounds=12"
declare -A ROWS=(
  [nonprivate]=""
  [sample-eps8]="privacy.mode=sample,privacy.target_epsilon=8,privacy.max_grad_norm=1.0,privacy.delta=1e-5"
  [sample-eps3]="privacy.mode=sample,privacy.target_epsilon=3,privacy.max_grad_norm=1.0,privacy.delta=1e-5"
  [sample-eps1]="privacy.mode=sample,privacy.target_epsilon=1,privacy.max_grad_norm=1.0,privacy.delta=1e-5"
  [sample-eps8-b64-ffa]="privacy.mode=sample,privacy.target_epsilon=8,privacy.max_grad_norm=1.0,privacy.delta=1e-5,train.batch_size=64,train.local_steps=5,adapter.ffa=true,aggregation.lora_mode=ffa"
  [clients100-nonprivate]="$C100"
  [clients100-z0.3]="$C100,privacy.mode=client-central,privacy.noise_multiplier=0.3,privacy.clip_norm=1.0,privacy.delta=1e-3"
  [clients100-z1.0]="$C100,privacy.mode=client-central,privacy.noise_multiplier=1.0,privacy.clip_norm=1.0,privacy.delta=1e-3"
)
ORDER=(nonprivate sample-eps8 sample-eps3 sample-eps1 sample-eps8-b64-ffa clients100-nonprivate clients100-z0.3 clients100-z1.0)
[ $# -gt 0 ] && ORDER=("$@")
args=()
for r in "${ORDER[@]}"; do args+=(--row "$r:${ROWS[$r]}"); done
for o in ${SETS:-}; do args+=(--set "$o"); done  # e.g. SETS="federation.eval_every=6" (fewer evaluations, same training)
$PY bench/table.py --config simulations/configs/default.toml --out "$OUT" "${args[@]}"
