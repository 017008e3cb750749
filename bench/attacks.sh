#!/usr/bin/env bash
# Attacks x defences on the demo task (simulations/configs/default.toml) with all 10 clients each
# round: sign flip, scale x10, Gaussian noise, ALIE and label flipping by 2 and by 4 of the 10
# clients (attack.fraction 0.2 / 0.4, chosen from attack.seed, the same in every row), AGR-tailored
# updates crafted against each row's own robust rule, plus the
# no-attack rows, under FedAvg, norm bounding, median, trimmed mean, Krum, Multi-Krum (keeping n - f of
# the n updates, averaged) and median + norm bound.
# Row names are ATTACK[M]-DEFENCE (none-fedavg, sign2-median, alie4-krum, ...). Pass row names to
# run a subset; every row is one `fedtune simulate` (bench/table.py), results in $OUT, then the
# pivot table (final accuracy, loss in brackets) is printed from $OUT/results.json.
#
# NORM: aggregation.max_update_norm of the norm-bounding rows; GAUSS: the Gaussian attack's noise
# L2 norm; ALIE_Z: ALIE's z (Baruch et al.'s z_max is 0 for 2 of 10 attackers and 0.43 for 4, so
# one common z is used). Honest updates have L2 norm ~1.35 in round 1 (20 local steps of LoRA r=8
# on MiniLM, lr 1e-3; smaller later, the lr decays), so NORM 2.0 bounds at ~1.5x that and GAUSS 10.0
# sends ~7x an honest norm. The IID table in BENCHMARKS.md (lr 3e-3, 10 steps) has honest norms of 2.6-2.7 in round 1:
# it runs with NORM=4.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results/attacks}
NORM=${NORM:-2.0}
GAUSS=${GAUSS:-10.0}
ALIE_Z=${ALIE_Z:-1.0}
ALL="federation.fraction_train=1.0,federation.min_train_clients=10"
declare -A ATTACK=(
  [none]=""
  [sign]="attack.kind=sign-flip"
  [scale]="attack.kind=scale,attack.factor=10.0"
  [gauss]="attack.kind=gaussian,attack.noise_norm=$GAUSS"
  [alie]="attack.kind=alie,attack.z=$ALIE_Z"
  [flip]="attack.kind=label-flip"
  # AGR-tailored (Shejwalkar & Houmansadr 2021): mean - gamma * std, gamma searched against the row's own rule
  # from gamma_init 10 (agr) or 1 (agrg1: against Krum a gamma near 20 std is never picked by the real server)
  [agr]="attack.kind=agr-tailored"
  [agrg1]="attack.kind=agr-tailored,attack.gamma_init=1.0"
)
declare -A DEFENCE=(
  [fedavg]=""
  [norm]="aggregation.max_update_norm=$NORM"
  [median]="aggregation.robust=median"
  [trimmed]="aggregation.robust=trimmed-mean,aggregation.trim_beta=BETA"
  [krum]="aggregation.robust=krum,aggregation.num_malicious=M"
  [multikrum]="aggregation.robust=multikrum,aggregation.num_malicious=M"
  [median-norm]="aggregation.robust=median,aggregation.max_update_norm=$NORM"
)
DEFENCES=(fedavg norm median trimmed krum multikrum median-norm)
declare -A ROWS=()
ORDER=()
for d in "${DEFENCES[@]}"; do  # no attack: (Multi-)Krum assumes 2 attackers, the trimmed mean cuts 2 of 10 per side
  ROWS[none-$d]="$ALL${DEFENCE[$d]:+,${DEFENCE[$d]}}"; ROWS[none-$d]=${ROWS[none-$d]//BETA/0.2}; ROWS[none-$d]=${ROWS[none-$d]//=M/=2}
  ORDER+=("none-$d")
done
for m in 2 4; do
  for a in sign scale gauss alie flip agr agrg1; do
    for d in "${DEFENCES[@]}"; do
      [[ "$a" == agr* && "$d" == fedavg ]] && continue  # refused: no robust rule to tailor against
      row="$ALL,${ATTACK[$a]},attack.fraction=0.$m${DEFENCE[$d]:+,${DEFENCE[$d]}}"
      row=${row//BETA/0.$m}; row=${row//=M/=$m}  # trim as many as attack; (Multi-)Krum told how many attack
      ROWS[$a$m-$d]=$row
      ORDER+=("$a$m-$d")
    done
  done
done
[ $# -gt 0 ] && ORDER=("$@")
args=()
for r in "${ORDER[@]}"; do
  [ -n "${ROWS[$r]+x}" ] || { echo "unknown row $r (known: ${!ROWS[*]})" >&2; exit 2; }
  args+=(--row "$r:${ROWS[$r]}")
done
for o in ${SETS:-}; do args+=(--set "$o"); done  # e.g. SETS="federation.rounds=2" for a smoke run
$PY bench/table.py --config simulations/configs/default.toml --out "$OUT" "${args[@]}"
$PY - "$OUT/results.json" "${DEFENCES[@]}" <<'EOF'
import json, sys
results = {r["row"]: r for r in json.load(open(sys.argv[1]))}
defences = sys.argv[2:]
attacks = sorted({r.split("-", 1)[0] for r in results})
print("\n| attack | " + " | ".join(defences) + " |\n|---|" + "---|" * len(defences))
for a in ["none"] + [a for a in attacks if a != "none"]:
    cells = []
    for d in defences:
        r = results.get(f"{a}-{d}")
        cells.append("" if r is None else "error" if "error" in r else f"{r['accuracy']:.4f} ({r['loss']:.3f})")
    if any(cells):
        print(f"| {a} | " + " | ".join(cells) + " |")
EOF
