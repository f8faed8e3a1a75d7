#!/usr/bin/env bash
# Every GPU figure of benchmarks/NOTES.md in one call (meant for one device lease, < 8 minutes).
# Writes <name>.json to $OUT when set (else ./bench-out) and a log; prints each SUMMARY line.
#   bash benchmarks/run_gpu.sh                    # all figures
#   E2E_EPOCHS=100 bash benchmarks/run_gpu.sh     # the full protocol measured, not projected (longer)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench-out}"; export OUT; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
E2E_EPOCHS="${E2E_EPOCHS:-25}"  # 100 = the paper; 25 fits the 8-minute call and is projected to 100
E2E_WORK="${E2E_WORK:-scratch/e2e}"
log="$OUT/run_gpu.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log"
run() {  # name, time limit in seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name ($*)" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log" | grep -E "^SUMMARY|Error|error" || echo "$name: failed or timed out" | tee -a "$log"
}
run viewport 45 "$PY" benchmarks/bench_viewport.py --device cuda --repeat 10
run inference 60 "$PY" benchmarks/bench_inference.py --device cuda --amp bf16 --batch 64
run training 90 "$PY" benchmarks/bench_training.py --device cuda --images 240 --epochs 2
run end_to_end 270 "$PY" benchmarks/bench_end_to_end.py --work "$E2E_WORK" --device cuda --epochs "$E2E_EPOCHS" --workers 16
grep -h "^SUMMARY" "$log"
