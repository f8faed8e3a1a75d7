#!/usr/bin/env bash
# Every GPU check and figure of benchmarks/NOTES.md in one call of at most 6 minutes on one H100/H200:
# the data are made first (untimed), then a CUDA smoke run of every script and option, then the figures.
# Each step has its own time limit (they sum to 360 s) and, as soon as it ends, one line in
# $OUT/results.jsonl and $OUT/summary.txt (status ok / failed / timed out, its figures): a step that is
# killed loses only itself. The smoke also appends each of its checks to $OUT/smoke.jsonl. The whole
# log goes to $OUT/run_gpu.log. OUT defaults to ./bench-out.
#
#   bash benchmarks/run_gpu.sh                 # on a CUDA machine
#   bash benchmarks/run_gpu.sh --cpu           # the very same steps at CPU sizes (CUDA-only checks say so)
#   bash benchmarks/run_gpu.sh --cpu --only env,prepare,viewport   # some steps
#   E2E_EPOCHS=100 bash benchmarks/run_gpu.sh  # the whole protocol measured, not projected (much longer)
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) MODE=cpu ;;
    --only) ONLY=",$2,"; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "run_gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUT="${OUT:-bench-out}"; export OUT; mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"; export OUT
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
SCRATCH="${SCRATCH:-scratch/run_gpu}"
log="$OUT/run_gpu.log"
export PYTHONUNBUFFERED=1
if [ "$MODE" = gpu ]; then
  DEV=cuda WORKERS=16 E2E_EPOCHS="${E2E_EPOCHS:-2}"
  E2E_DB=(--contents 8 --size 2048x1024) E2E_SIZES=()
  VIEWPORT=(--device cuda --repeat 10) INFERENCE=(--device cuda --amp bf16 --batch 64 --files 16)
  TRAINING=(--device cuda --images 240 --epochs 2) PREDICT=(--device cuda --images 128)
else
  DEV=cpu WORKERS=2 E2E_EPOCHS="${E2E_EPOCHS:-1}"
  E2E_DB=(--contents 5 --size 256x128) E2E_SIZES=(--face-size 32 --erp-size 64x32)
  VIEWPORT=(--device cpu --repeat 2) INFERENCE=(--device cpu --amp none --batch 2 --erp-size 128x64 --source-size 256x128 --face-size 32 --files 2 --quick)
  TRAINING=(--device cpu --images 12 --face-size 32 --erp-size 64x32 --epochs 1) PREDICT=(--device cpu --images 8 --size 256x128 --erp-size 64x32 --folds 2)
fi

record() {  # name, status, seconds: the runner's own line when the step wrote none
  python3 - "$@" <<'EOF'
import json, os, sys
from pathlib import Path
name, status, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
out = Path(os.environ["OUT"])
tail = (out / "run_gpu.log").read_text(errors="replace")[-1500:]
with open(out / "results.jsonl", "a") as f:
    f.write(json.dumps({"name": name, "status": status, "seconds": seconds, "log_tail": tail}) + "\n")
with open(out / "summary.txt", "a") as f:
    f.write(f"{name}: {status} after {seconds:.0f} s\n")
EOF
}
lines() { [ -f "$OUT/results.jsonl" ] && wc -l < "$OUT/results.jsonl" || echo 0; }
run() {  # name, limit on a GPU (s), limit on the CPU (s), command...
  local name=$1 limit=$2; [ "$MODE" = cpu ] && limit=$3; shift 3
  if [ -n "$ONLY" ] && [[ "$ONLY" != *",$name,"* ]]; then return; fi
  echo "== $name (limit ${limit} s): $*" | tee -a "$log"
  local start=$SECONDS before; before=$(lines)
  timeout -k 5 "$limit" "$@" >>"$log" 2>&1
  local code=$? took=$((SECONDS - start))
  echo "-- $name: exit $code after $took s" | tee -a "$log"
  if [ "$code" -eq 124 ] || [ "$code" -eq 137 ]; then record "$name" "timed out (limit $limit s)" "$took"
  elif [ "$code" -ne 0 ]; then record "$name" "failed (exit $code)" "$took"
  elif [ "$(lines)" = "$before" ]; then record "$name" "ok" "$took"; fi
  tail -n 1 "$OUT/summary.txt" 2>/dev/null
}
needs_cuda() {  # name: a step that only means something on a GPU, on a CPU run
  if [ -n "$ONLY" ] && [[ "$ONLY" != *",$1,"* ]]; then return; fi
  echo "== $1: skipped: needs CUDA" | tee -a "$log"; record "$1" "skipped: needs CUDA" 0
}

# Step limits on a GPU (sum 360 s; each from an estimate of its work, benchmarks/NOTES.md) and on the CPU:
run env 8 30 bash -c "date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo 'no nvidia-smi'; \
  $PY -c 'import torch, sys; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))'"
# The data, once and untimed by the figures: the smoke's two databases, the protocol's database, predict's photos.
run prepare 28 300 bash -c "set -e
  $PY make_synthetic_db.py --out $SCRATCH/smoke/A --contents 5 --size 256x128 --seed 0 --workers $WORKERS --overwrite
  $PY make_synthetic_db.py --out $SCRATCH/smoke/B --contents 5 --size 256x128 --seed 1 --workers $WORKERS --overwrite
  $PY make_synthetic_db.py --out $SCRATCH/e2e/SyntheticOIQA ${E2E_DB[*]} --workers $WORKERS --overwrite
  $PY benchmarks/bench_predict.py --work $SCRATCH/predict ${PREDICT[*]} --prepare-only"
run smoke 120 900 "$PY" benchmarks/gpu_smoke.py --work "$SCRATCH/smoke" --device "$DEV" --part main
run compile 72 300 "$PY" benchmarks/gpu_smoke.py --work "$SCRATCH/smoke" --device "$DEV" --part compile
run viewport 12 120 "$PY" benchmarks/bench_viewport.py "${VIEWPORT[@]}"
run inference 17 120 "$PY" benchmarks/bench_inference.py "${INFERENCE[@]}"
run training 18 300 "$PY" benchmarks/bench_training.py "${TRAINING[@]}"
run predict 12 120 "$PY" benchmarks/bench_predict.py --work "$SCRATCH/predict" "${PREDICT[@]}"
run end_to_end 40 600 "$PY" benchmarks/bench_end_to_end.py --work "$SCRATCH/e2e" --reuse --device "$DEV" \
  --epochs "$E2E_EPOCHS" --workers "$WORKERS" "${E2E_SIZES[@]}"
if [ "$MODE" = gpu ]; then
  run end_to_end_parallel 33 0 "$PY" benchmarks/bench_end_to_end.py --work "$SCRATCH/e2e" --reuse --device cuda \
    --epochs "$E2E_EPOCHS" --workers "$WORKERS" --parallel-folds 2
else
  needs_cuda end_to_end_parallel  # 2 processes sharing one GPU; on 2 CPU cores it measures nothing
fi
echo "== summary" | tee -a "$log"
cat "$OUT/summary.txt" | tee -a "$log"
! grep -q -E ": (failed|timed out)" "$OUT/summary.txt"
