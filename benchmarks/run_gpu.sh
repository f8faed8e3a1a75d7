#!/usr/bin/env bash
# Every GPU check and figure of benchmarks/NOTES.md in one call (one device lease, under 8 minutes):
# a CUDA smoke run of every script (bf16 and fp32), then the figures. Writes <name>.json and
# run_gpu.log to $OUT when set (else ./bench-out); prints each SUMMARY line. A failing part does not
# stop the others.
#   bash benchmarks/run_gpu.sh
#   E2E_EPOCHS=100 bash benchmarks/run_gpu.sh      # the whole protocol measured, not projected (longer)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench-out}"; export OUT; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
E2E_EPOCHS="${E2E_EPOCHS:-4}"   # projected to the paper's 100
SCRATCH="${SCRATCH:-scratch}"
log="$OUT/run_gpu.log"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } 2>&1 | tee "$log"
run() {  # name, time limit in seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name ($*)" | tee -a "$log"
  local start=$SECONDS
  timeout "$limit" "$@" >>"$log" 2>&1
  local code=$?
  echo "-- $name: exit $code after $((SECONDS - start)) s" | tee -a "$log"
}
run smoke 170 "$PY" benchmarks/gpu_smoke.py --work "$SCRATCH/smoke" --device cuda
run viewport 30 "$PY" benchmarks/bench_viewport.py --device cuda --repeat 10
run inference 35 "$PY" benchmarks/bench_inference.py --device cuda --amp bf16 --batch 64
run training 45 "$PY" benchmarks/bench_training.py --device cuda --images 240 --epochs 2
run predict 30 "$PY" benchmarks/bench_predict.py --work "$SCRATCH/predict" --device cuda --images 256
# The OIQA-sized database once (16 contents x 21 images from 4096x2048 sources), then the protocol on it.
run e2e_database 60 "$PY" make_synthetic_db.py --out "$SCRATCH/e2e/SyntheticOIQA" --contents 16 --size 4096x2048 --workers 16 --overwrite
run end_to_end 70 "$PY" benchmarks/bench_end_to_end.py --work "$SCRATCH/e2e" --reuse --device cuda --epochs "$E2E_EPOCHS" --workers 16
run end_to_end_parallel 45 "$PY" benchmarks/bench_end_to_end.py --work "$SCRATCH/e2e" --reuse --device cuda --epochs "$E2E_EPOCHS" --workers 16 --parallel-folds 5
echo "== summary" | tee -a "$log"
grep -h "^SUMMARY" "$log" | tee "$OUT/summary.txt"
