#!/usr/bin/env bash
# LoRA aggregation table on the demo task (simulations/configs/default.toml) at Dirichlet alpha 0.5 and
# 0.1: naive vs exact vs FFA-LoRA, heterogeneous ranks {2,4,8,16} vs all clients at rank 8,
# FedAvg vs FedAdam vs FedProx vs SCAFFOLD at alpha 0.1, and FedProx, FedAvgM and SGD clients at alpha 0.5.
# Pass row names to run a subset.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results/aggregation}
HET="adapter.r=16,aggregation.lora_mode=hetero,aggregation.client_ranks=[2,4,8,16]"
declare -A ROWS=(
  [a0.5-naive]="data.dirichlet_alpha=0.5"
  [a0.5-exact]="data.dirichlet_alpha=0.5,aggregation.lora_mode=exact"
  [a0.5-ffa]="data.dirichlet_alpha=0.5,aggregation.lora_mode=ffa,adapter.ffa=true"
  [a0.5-hetero]="data.dirichlet_alpha=0.5,$HET"
  [a0.1-naive]="data.dirichlet_alpha=0.1"
  [a0.1-exact]="data.dirichlet_alpha=0.1,aggregation.lora_mode=exact"
  [a0.1-ffa]="data.dirichlet_alpha=0.1,aggregation.lora_mode=ffa,adapter.ffa=true"
  [a0.1-hetero]="data.dirichlet_alpha=0.1,$HET"
  [a0.1-fedadam]="data.dirichlet_alpha=0.1,aggregation.server_optimizer=fedadam,aggregation.server_lr=0.01"
  [a0.1-fedprox]="data.dirichlet_alpha=0.1,aggregation.server_optimizer=fedprox,aggregation.proximal_mu=0.01"
  [a0.1-scaffold]="data.dirichlet_alpha=0.1,aggregation.server_optimizer=scaffold"
  [a0.5-fedprox]="data.dirichlet_alpha=0.5,aggregation.server_optimizer=fedprox,aggregation.proximal_mu=0.01"
  [a0.5-sgd]="data.dirichlet_alpha=0.5,train.optimizer=sgd,train.momentum=0.9,train.lr=5e-2"
  # FedAvgM: server momentum over the rounds' mean updates, so one step carries the last few rounds' silos
  [a0.5-fedavgm]="data.dirichlet_alpha=0.5,aggregation.server_optimizer=fedavgm,aggregation.server_lr=1.0,aggregation.server_momentum=0.5"
  [a0.5-fedavgm-m8]="data.dirichlet_alpha=0.5,aggregation.server_optimizer=fedavgm,aggregation.server_lr=0.3,aggregation.server_momentum=0.8"
)
ORDER=(a0.5-naive a0.5-exact a0.5-ffa a0.5-hetero a0.1-naive a0.1-exact a0.1-ffa a0.1-hetero a0.1-fedadam a0.1-fedprox a0.1-scaffold a0.5-fedprox a0.5-sgd a0.5-fedavgm a0.5-fedavgm-m8)
[ $# -gt 0 ] && ORDER=("$@")
args=()
for r in "${ORDER[@]}"; do args+=(--row "$r:${ROWS[$r]}"); done
for o in ${SETS:-}; do args+=(--set "$o"); done  # e.g. SETS="federation.eval_every=6" (fewer evaluations, same training)
$PY bench/table.py --config simulations/configs/default.toml --out "$OUT" "${args[@]}"
