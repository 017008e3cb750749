#!/usr/bin/env bash
# Per-round time of the tiny run in deployment, on loopback (BENCHMARKS.md, "Cross-silo deployment").
#   docs/deploy-round-time.sh process|subprocess [ROUNDS]
# Starts an insecure SuperLink and 3 SuperNodes with `fedtune deploy`, runs `flwr run --stream`,
# prints the round times from metrics.jsonl, and stops every process it started (by process group).
set -u
ISO=${1:?process or subprocess}; ROUNDS=${2:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PATH=$ROOT/.venv/bin:$PATH FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
  FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
W=$(mktemp -d /tmp/fedtune-round-time.XXXXXX)
mkdir -p "$W/app" "$W/home-cli"
cp "$ROOT/pyproject.toml" "$W/app/"
for d in fedtune server clients simulations; do cp -r "$ROOT/$d" "$W/app/"; done
find "$W/app" -name __pycache__ -prune -exec rm -rf {} +
PORT=$((19000 + RANDOM % 800))
printf '[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:%s"\ninsecure = true\n' "$PORT" \
  > "$W/home-cli/config.toml"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null; done
  sleep 3
  for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null; done
}
trap cleanup EXIT
FLWR_HOME=$W/home-superlink setsid fedtune deploy superlink --insecure --port "$PORT" > "$W/superlink.log" 2>&1 &
pids+=($!)
for i in 1 2 3; do
  FLWR_HOME=$W/home-silo-$i setsid fedtune deploy supernode --insecure --superlink "127.0.0.1:$PORT" \
    --partition-id $((i - 1)) --num-partitions 3 --port $((29000 + RANDOM % 800)) --isolation "$ISO" \
    > "$W/silo-$i.log" 2>&1 &
  pids+=($!)
done
until [ "$(FLWR_HOME=$W/home-cli flwr supernode list bench --format json 2>/dev/null | grep -c '"online"')" = 3 ]; do
  sleep 1
done
t0=$(date +%s.%N)
FLWR_HOME=$W/home-cli flwr run "$W/app" bench --stream --run-config \
  "config=\"simulations/configs/tiny.toml\" overrides=\"output.dir=$W/out federation.num_clients=3 federation.rounds=$ROUNDS\"" \
  > "$W/run.log" 2>&1
echo "isolation $ISO: flwr run wall $(python -c "import time; print(round(time.time() - $t0, 1))") s; logs in $W"
python - "$W/out/metrics.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["round"]:
        print(f"round {r['round']}: {r['seconds']:.2f} s, {r['accepted']} updates, accuracy {r['eval'].get('accuracy')}")
PY
