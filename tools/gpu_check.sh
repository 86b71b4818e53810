#!/usr/bin/env bash
# The GPU run, prepared for its one try: install, imports, data, the CUDA test set, a timing table,
# a short quickstart trained on the GPU and the evaluation tests on it.
#
#   bash tools/gpu_check.sh --fetch    # here (network): the wheels the GPU machine lacks, into .whl/
#   bash tools/gpu_check.sh            # on the GPU machine (Python 3.12, its own torch, torchvision,
#                                      # timm, onnxruntime; no network)
#   bash tools/gpu_check.sh --dry-run  # on a CPU machine: every step's plumbing in its CPU-sized
#                                      # form, the carried wheels installed and imported as on the
#                                      # GPU, the same JSON (tests/test_gpu_check.py runs it)
#
# With the device tool: run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=CALL_S).
# There is one try and no rerun: the session's device time covers one machine start and one call.
# Every step has its own limit and a GRACE_S kill grace; limits plus graces stay within BUDGET_S,
# under the call's CALL_S. Each step's record (name, exit status, seconds, limit, note) is written
# to $OUT/gpu_check.json as the step ends, so a run cut short still returns what finished. A failed
# install or import stops the run (every later step would fail the same way). Writes $OUT (default
# output/gpu_check): gpu_check.log, gpu_check.json, gpu_timing.md/.json, pytest_cuda.xml,
# quickstart_ap.md, quickstart_metrics_tail.json.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
CALL_S=570
BUDGET_S=540
GRACE_S=5
# the wheels --fetch makes, one per package (the GPU image holds the rest: docs/gpu.md)
EXPECTED_WHEELS=(pycocotools yacs iopath omegaconf hydra_core termcolor fvcore
  antlr4_python3_runtime sal_detectron2)

check_wheels() {  # exactly one wheel per expected package and nothing else; lists the set
  local dir=$1 n name count
  n=$(find "$dir" -maxdepth 1 -type f -name '*.whl' | wc -l)
  for name in "${EXPECTED_WHEELS[@]}"; do
    count=$(find "$dir" -maxdepth 1 -type f -name "${name}-*.whl" | wc -l)
    if [ "$count" -ne 1 ]; then
      echo "gpu_check: $dir holds $count wheels of $name, expected 1 (bash tools/gpu_check.sh --fetch remakes the set)" >&2
      return 1
    fi
  done
  if [ "$n" -ne ${#EXPECTED_WHEELS[@]} ]; then
    echo "gpu_check: $dir holds $n wheels, expected ${#EXPECTED_WHEELS[@]} (${EXPECTED_WHEELS[*]})" >&2
    return 1
  fi
}

if [ "${1:-}" = "--fetch" ]; then
  set -e  # any failed download or build fails the fetch
  # versions pinned as in requirements.txt; Python 3.12, manylinux x86-64
  if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
  elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
  else PY=python3; fi
  pin() {
    local line
    line=$(grep -E "^$1==" requirements.txt | head -n 1)
    [ -n "$line" ] || { echo "gpu_check: $1 is not pinned in requirements.txt" >&2; return 1; }
    echo "$line"
  }
  rm -rf "$WHEELS"  # a stale wheel beside a new one stops the install on the GPU
  mkdir -p "$WHEELS"
  if [ -d .git ] && [ "$WHEELS" = .whl ]; then
    grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  fi
  pins=()
  for p in pycocotools yacs iopath omegaconf hydra-core termcolor fvcore; do pins+=("$(pin "$p")"); done
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" "${pins[@]:0:6}"
  # pure-Python packages published as source only: built into wheels here
  $PY -m pip wheel -q --no-deps -w "$WHEELS" "${pins[6]}" antlr4-python3-runtime==4.9.3
  # detectron2: the cp310 wheel is pure Python apart from an optional extension (setup_env.sh)
  tmp=$(mktemp -d)
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 \
    sal-detectron2==0.7.2 -d "$tmp"
  mv "$tmp"/sal_detectron2-*.whl "$WHEELS/sal_detectron2-0.7.2-py3-none-any.whl"
  rm -rf "$tmp"
  check_wheels "$WHEELS"
  ls -l "$WHEELS"
  echo "gpu_check: fetched ${#EXPECTED_WHEELS[@]} wheels into $WHEELS"
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
# the log is written straight to its file (a pipe through tee can lose the last lines when the
# script ends); the whole of it is shown at the end, or read from $OUT when the call was cut
exec 3>&1 >"$LOG" 2>&1
trap 'cat "$LOG" >&3' EXIT
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
WORK=$(mktemp -d)  # data and outputs of the steps; only $OUT comes back
SITE="$WORK/site"  # the carried wheels' own site, first on the path
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
RUNNING=""
START_ALL=$(date +%s)
write_json() {  # the whole file, rewritten at every step's start and end (atomically)
  local body
  body=$(IFS=,; echo "${RECORDS[*]:-}")
  printf '{"mode": "%s", "device": "%s", "call_s": %d, "budget_s": %d, "grace_s": %d, "limits_sum_s": %d, "elapsed_s": %d, "running": "%s", "steps": [%s]}\n' \
    "$MODE" "${DEVICE//\"/\'}" "$CALL_S" "$BUDGET_S" "$GRACE_S" "$LIMITS" \
    "$(( $(date +%s) - START_ALL ))" "$RUNNING" "$body" > "$JSON.tmp" && mv "$JSON.tmp" "$JSON"
}
record() {  # record NAME EXIT SECONDS LIMIT [NOTE]
  RECORDS+=("$(printf '{"name": "%s", "exit": %d, "seconds": %d, "limit_s": %d, "note": "%s"}' \
    "$1" "$2" "$3" "$4" "${5:-}")")
  RUNNING=""
  write_json
}
cut_note() {  # the note for a step's exit status
  case "$1" in
    124) echo "cut at its limit (SIGTERM)" ;;
    137) echo "cut: killed (SIGKILL) after its limit and ${GRACE_S} s grace, or out of memory" ;;
  esac
}
step() {  # step NAME LIMIT_S COMMAND...: run it under its limit, record it; returns its exit status
  local name=$1 limit=$2
  shift 2
  LIMITS=$((LIMITS + limit))
  RUNNING=$name
  write_json  # a call cut during this step returns a JSON that names it
  echo "== $name (limit ${limit}s)"
  local start rc
  start=$(date +%s)
  # SIGTERM at the limit (a training stops with a checkpoint), SIGKILL GRACE_S later
  timeout -k "$GRACE_S" "$limit" "$@"
  rc=$?
  local took=$(( $(date +%s) - start ))
  echo "== $name: exit $rc after ${took} s"
  record "$name" "$rc" "$took" "$limit" "$(cut_note "$rc")"
  return $rc
}
skip() {  # skip NAME LIMIT_S WHY: a step this mode does not run, with the reason
  LIMITS=$((LIMITS + $2))
  echo "== $1: skipped ($3)"
  record "$1" 0 0 "$2" "skipped: $3"
}
stop() { echo "== stopping: $1"; write_json; exit 1; }
write_json

# 1. install: the carried wheels (checked: one per expected package) into a site of their own,
# first on the path for every later step. Dry run: the wheels that match this Python (the pure-
# Python ones), the same way, so the imports step reads them from that site as the GPU run will.
WHEEL_FILES=()
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  check_wheels "$WHEELS" || stop "the wheel set in $WHEELS is not the one --fetch makes"
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
  step install 15 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" "${WHEEL_FILES[@]}" || stop "the install failed"
  export PYTHONPATH="$SITE:$(pwd)" CARRIED_SITE="$SITE"
elif [ $DRY -eq 1 ]; then
  skip install 15 "no wheel in $WHEELS/ (bash tools/gpu_check.sh --fetch makes them)"
else
  stop "no wheel in $WHEELS/: run bash tools/gpu_check.sh --fetch here and carry .whl"
fi

# 2. imports (60 s: a cold first import of torch and CUDA's start on a fresh machine take tens of
# seconds): everything the steps import, the LazyConfigs loaded, and every carried package read
# from the carried site
IMPORTS='import importlib, os
import torch, torchvision, timm, detectron2, pycocotools, cbam_hrnet_d2, cbam_hrnet_d2.benchmark
from detectron2.config import LazyConfig
for c in ("configs/lazy/mask_rcnn_cbam_hrnet_w18_fpn.py", "configs/lazy/mask_rcnn_cbam_hrnet_w18_fpn_shapes.py"):
    LazyConfig.load(c)
site = os.environ.get("CARRIED_SITE")
if site:
    names = {"detectron2", "fvcore", "iopath", "yacs", "omegaconf", "hydra", "termcolor", "antlr4", "pycocotools"}
    carried = sorted(n for n in names if os.path.isdir(os.path.join(site, n)))
    for n in carried:
        f = importlib.import_module(n).__file__
        assert f.startswith(site), f"{n} imported from {f}, not from the carried site {site}"
    print("from the carried site:", " ".join(carried))
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "detectron2", detectron2.__version__)'
[ $DRY -eq 1 ] || IMPORTS="$IMPORTS
assert torch.cuda.is_available(), 'no CUDA device visible to torch'"
step imports 60 $PY -c "$IMPORTS" || stop "an import failed"

# 3. data (35 s): the shapes splits the quickstart and evaluation read (dry run: the 200
# validation images only)
if [ $DRY -eq 1 ]; then
  step data 35 $PY -m cbam_hrnet_d2.data --splits val
else
  step data 35 $PY -m cbam_hrnet_d2.data --splits train val
fi

# 4. the CUDA test set but the evaluation tests (125 s; skipped "CUDA not available" on a CPU)
step cuda_tests 125 $PY -m pytest -q -m cuda -k "not TestEvalOnCuda" tests/test_cuda.py \
  -p no:cacheprovider --junitxml "$OUT/pytest_cuda.xml"

# 5. timing table (75 s; its files rewritten after every row, so a cut keeps the rows done; dry
# run: two rows on the CPU at 128x192, one round)
if [ $DRY -eq 1 ]; then
  step timing 75 $PY tools/gpu_timing.py --out "$OUT" --device cpu --size 128 192 --iters 1 \
    --warmup 0 --rows 2
else
  step timing 75 $PY tools/gpu_timing.py --out "$OUT" --iters 5
fi

# 6. a short quickstart on the GPU (95 s: 400 iterations, step at 340, evaluated; dry run: 2
# iterations on the validation images, not evaluated: a random model's detections make a CPU
# evaluation take minutes), the model the evaluation tests read
QS="$WORK/quickstart"
if [ $DRY -eq 1 ]; then
  QS_OPTS=(MODEL.DEVICE cpu SOLVER.MAX_ITER 2 SOLVER.STEPS "(1,)" SOLVER.IMS_PER_BATCH 2
    DATALOADER.NUM_WORKERS 0 DATASETS.TRAIN "('shapes_val',)" DATASETS.TEST "()")
else
  QS_OPTS=(MODEL.DEVICE cuda SOLVER.MAX_ITER 400 SOLVER.STEPS "(340,)" DATALOADER.NUM_WORKERS 8)
fi
step quickstart 95 $PY train_net.py --config-file configs/shapes/mask_rcnn_CBAM_HRNet_W18_FPN_shapes.yaml \
  "${QS_OPTS[@]}" OUTPUT_DIR "$QS"
[ -f "$QS/ap_tables.md" ] && cp "$QS/ap_tables.md" "$OUT/quickstart_ap.md"
[ -f "$QS/metrics.json" ] && tail -n 3 "$QS/metrics.json" > "$OUT/quickstart_metrics_tail.json"

# 7. the evaluation tests on that model (100 s: three --eval-only runs, each with pure-Python
# COCO evaluation)
if [ -f "$QS/model_final.pth" ]; then
  export CBAM_HRNET_QUICKSTART="$QS/model_final.pth"
  step eval_tests 100 $PY -m pytest -q -m cuda -k TestEvalOnCuda tests/test_cuda.py \
    -p no:cacheprovider
else
  skip eval_tests 100 "the quickstart step left no model_final.pth"
fi
rm -rf "$WORK"
echo "== limits: ${LIMITS} s + ${#RECORDS[@]} x ${GRACE_S} s grace of a ${BUDGET_S} s budget (call ${CALL_S} s)"
write_json
cat "$JSON"
