#!/usr/bin/env bash
# The GPU run, prepared for its one try: install, imports, data, the CUDA test set, a timing table,
# a short quickstart trained on the GPU and the evaluation tests on it.
#
#   bash tools/gpu_check.sh --fetch    # here (network): the wheels the GPU machine lacks, into .whl/
#   bash tools/gpu_check.sh            # on the GPU machine (Python 3.12, its own torch, torchvision,
#                                      # timm, onnxruntime; no network)
#   bash tools/gpu_check.sh --dry-run  # on a CPU machine: every step's plumbing in its CPU-sized
#                                      # form, the same JSON (tests/test_gpu_check.py runs it)
#
# With the device tool: run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=570).
# Every step has its own limit; together they stay within BUDGET_S (540 s), the install included,
# under the tool's 600 s a call. Each step's record (name, exit status, seconds, limit) is written
# to $OUT/gpu_check.json as the step ends, so a run cut short still returns what finished. A failed
# install or import stops the run (every later step would fail the same way). Writes $OUT (default
# output/gpu_check): gpu_check.log, gpu_check.json, gpu_timing.md/.json, pytest_cuda.xml,
# quickstart_ap.md, quickstart_metrics_tail.json.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
BUDGET_S=540

if [ "${1:-}" = "--fetch" ]; then
  # versions pinned as in requirements.txt; Python 3.12, manylinux x86-64
  PY=.venv/bin/python
  pin() { grep -E "^$1==" requirements.txt | head -n 1; }
  mkdir -p "$WHEELS"
  grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" \
    "$(pin pycocotools)" "$(pin yacs)" "$(pin iopath)" "$(pin omegaconf)" "$(pin hydra-core)" \
    "$(pin termcolor)"
  # pure-Python packages published as source only: built into wheels here
  $PY -m pip wheel -q --no-deps -w "$WHEELS" "$(pin fvcore)" antlr4-python3-runtime==4.9.3
  # detectron2: the cp310 wheel is pure Python apart from an optional extension (setup_env.sh)
  tmp=$(mktemp -d)
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 \
    sal-detectron2==0.7.2 -d "$tmp"
  mv "$tmp"/sal_detectron2-*.whl "$WHEELS/sal_detectron2-0.7.2-py3-none-any.whl"
  rm -rf "$tmp"
  ls -l "$WHEELS"
  exit 0
fi

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
if [ $DRY -eq 1 ] && [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
OUT=${OUT:-output/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
JSON="$OUT/gpu_check.json"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
WORK=$(mktemp -d)  # data and outputs of the steps; only $OUT comes back
export PYTHONPATH=$(pwd)
if [ $DRY -eq 1 ]; then
  MODE=dry-run
  DEVICE="cpu (dry run): $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | xargs)"
  export DETECTRON2_DATASETS="$WORK/data"
else
  MODE=gpu
  # the machine's kind, as the driver names it (an H100 or an H200: the device tool decides)
  DEVICE=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1)
fi
echo "gpu_check: mode $MODE, device: $DEVICE, python $($PY -c 'import sys; print(sys.version.split()[0])')"

RECORDS=()
LIMITS=0
write_json() {  # the whole file, rewritten after every step (atomically: a cut run reads a whole one)
  local body
  body=$(IFS=,; echo "${RECORDS[*]:-}")
  printf '{"mode": "%s", "device": "%s", "budget_s": %d, "limits_sum_s": %d, "steps": [%s]}\n' \
    "$MODE" "${DEVICE//\"/\'}" "$BUDGET_S" "$LIMITS" "$body" > "$JSON.tmp" && mv "$JSON.tmp" "$JSON"
}
record() {  # record NAME EXIT SECONDS LIMIT [NOTE]
  RECORDS+=("$(printf '{"name": "%s", "exit": %d, "seconds": %d, "limit_s": %d, "note": "%s"}' \
    "$1" "$2" "$3" "$4" "${5:-}")")
  write_json
}
step() {  # step NAME LIMIT_S COMMAND...: run it under its limit, record it; returns its exit status
  local name=$1 limit=$2
  shift 2
  LIMITS=$((LIMITS + limit))
  echo "== $name (limit ${limit}s)"
  local start rc
  start=$(date +%s)
  timeout -k 5 "$limit" "$@"  # SIGTERM (a training stops with a checkpoint), SIGKILL 5 s later
  rc=$?
  local took=$(( $(date +%s) - start ))
  echo "== $name: exit $rc after ${took} s"
  record "$name" "$rc" "$took" "$limit" "$([ $rc -eq 124 ] && echo 'cut at its limit')"
  return $rc
}
skip() {  # skip NAME LIMIT_S WHY: a step this mode does not run, with the reason
  LIMITS=$((LIMITS + $2))
  echo "== $1: skipped ($3)"
  record "$1" 0 0 "$2" "skipped: $3"
}
stop() { echo "== stopping: $1"; write_json; exit 1; }
write_json

# 1. install (45 s): the carried wheels into a site of their own. Dry run: the wheels that match
# this Python, into a temporary site (the venv already holds every package).
WHEEL_FILES=()
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  if [ $DRY -eq 1 ]; then
    TAG="cp$($PY -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
    for w in "$WHEELS"/*.whl; do
      case "$w" in *-py3-none-any.whl|*-py2.py3-none-any.whl|*-"$TAG"-*.whl) WHEEL_FILES+=("$w") ;; esac
    done
  else
    WHEEL_FILES=("$WHEELS"/*.whl)
  fi
fi
if [ ${#WHEEL_FILES[@]} -gt 0 ]; then
  # (timeout runs programs, not shell functions: the pip command itself is the step)
  step install 45 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$WORK/site" "${WHEEL_FILES[@]}" || stop "the install failed"
  [ $DRY -eq 1 ] || export PYTHONPATH="$WORK/site:$(pwd)"
else
  skip install 45 "no wheel in $WHEELS/ for this Python (bash tools/gpu_check.sh --fetch makes them)"
fi

# 2. imports (30 s): everything the steps import, the LazyConfigs loaded (no pkg_resources needed)
IMPORTS='import torch, torchvision, timm, detectron2, pycocotools, cbam_hrnet_d2, cbam_hrnet_d2.benchmark
from detectron2.config import LazyConfig
for c in ("configs/lazy/mask_rcnn_cbam_hrnet_w18_fpn.py", "configs/lazy/mask_rcnn_cbam_hrnet_w18_fpn_shapes.py"):
    LazyConfig.load(c)
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "detectron2", detectron2.__version__)'
[ $DRY -eq 1 ] || IMPORTS="$IMPORTS
assert torch.cuda.is_available(), 'no CUDA device visible to torch'"
step imports 30 $PY -c "$IMPORTS" || stop "an import failed"

# 3. data (40 s): the shapes splits (dry run: the 200 validation images only)
if [ $DRY -eq 1 ]; then
  step data 40 $PY -m cbam_hrnet_d2.data --splits val
else
  step data 40 $PY -m cbam_hrnet_d2.data
fi

# 4. the CUDA test set but the evaluation tests (150 s; skipped "CUDA not available" on a CPU)
step cuda_tests 150 $PY -m pytest -q -m cuda -k "not TestEvalOnCuda" tests/test_cuda.py \
  -p no:cacheprovider --junitxml "$OUT/pytest_cuda.xml"

# 5. timing table (90 s; dry run: two rows on the CPU at 128x192, one round)
if [ $DRY -eq 1 ]; then
  step timing 90 $PY tools/gpu_timing.py --out "$OUT" --device cpu --size 128 192 --iters 1 \
    --warmup 0 --rows 2
else
  step timing 90 $PY tools/gpu_timing.py --out "$OUT" --iters 5
fi

# 6. a short quickstart on the GPU (120 s: 500 iterations, step at 420, evaluated; dry run: 2
# iterations on the validation images, not evaluated: a random model's detections make a CPU
# evaluation take minutes), the model the evaluation tests read
QS="$WORK/quickstart"
if [ $DRY -eq 1 ]; then
  QS_OPTS=(MODEL.DEVICE cpu SOLVER.MAX_ITER 2 SOLVER.STEPS "(1,)" SOLVER.IMS_PER_BATCH 2
    DATALOADER.NUM_WORKERS 0 DATASETS.TRAIN "('shapes_val',)" DATASETS.TEST "()")
else
  QS_OPTS=(MODEL.DEVICE cuda SOLVER.MAX_ITER 500 SOLVER.STEPS "(420,)" DATALOADER.NUM_WORKERS 8)
fi
step quickstart 120 $PY train_net.py --config-file configs/shapes/mask_rcnn_CBAM_HRNet_W18_FPN_shapes.yaml \
  "${QS_OPTS[@]}" OUTPUT_DIR "$QS"
[ -f "$QS/ap_tables.md" ] && cp "$QS/ap_tables.md" "$OUT/quickstart_ap.md"
[ -f "$QS/metrics.json" ] && tail -n 3 "$QS/metrics.json" > "$OUT/quickstart_metrics_tail.json"

# 7. the evaluation tests on that model (60 s)
if [ -f "$QS/model_final.pth" ]; then
  export CBAM_HRNET_QUICKSTART="$QS/model_final.pth"
  step eval_tests 60 $PY -m pytest -q -m cuda -k TestEvalOnCuda tests/test_cuda.py \
    -p no:cacheprovider
else
  skip eval_tests 60 "the quickstart step left no model_final.pth"
fi
rm -rf "$WORK"
echo "== limits: ${LIMITS} s of a ${BUDGET_S} s budget"
cat "$JSON"
