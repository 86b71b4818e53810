#!/usr/bin/env bash
# The GPU run, prepared: the CUDA test set, a timing table and a quickstart trained on the GPU.
#
#   bash tools/gpu_check.sh --fetch   # here (network): the wheels the GPU machine lacks, into .whl/
#   bash tools/gpu_check.sh           # on the GPU machine (one H200, Python 3.12, its own torch,
#                                     # torchvision, timm, onnxruntime; no network)
#
# With the device tool: run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=600).
# Writes $OUT (default output/gpu_check): gpu_check.log, gpu_check.json (each step's exit status
# and seconds), gpu_timing.md/.json, pytest_cuda.xml, quickstart_ap.md, quickstart_metrics_tail.json. Each step has its own time
# limit so that one hang cannot eat the others' (about 8 minutes in all).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=.whl

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

OUT=${OUT:-output/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
if [ -d "$WHEELS" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$(pwd)
else
  export PYTHONPATH=$(pwd)
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -c "import torch, torchvision, timm, detectron2; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'detectron2', detectron2.__version__)"

declare -A STATUS SECONDS_OF
step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local start=$(date +%s)
  timeout "$limit" "$@"
  STATUS[$name]=$?
  SECONDS_OF[$name]=$(( $(date +%s) - start ))
  echo "== $name: exit ${STATUS[$name]} after ${SECONDS_OF[$name]} s"
}

step data 120 $PY -m cbam_hrnet_d2.data
step cuda_tests 200 $PY -m pytest -q -m cuda -k "not TestEvalOnCuda" tests/test_cuda.py \
  -p no:cacheprovider --junitxml "$OUT/pytest_cuda.xml"
step timing 150 $PY tools/gpu_timing.py --out "$OUT" --iters 8
QS=output/gpu_quickstart  # outside $OUT: only small files come back
step quickstart 240 $PY train_net.py --config-file configs/shapes/mask_rcnn_CBAM_HRNet_W18_FPN_shapes.yaml \
  MODEL.DEVICE cuda DATALOADER.NUM_WORKERS 8 OUTPUT_DIR "$QS"
[ -f "$QS/ap_tables.md" ] && cp "$QS/ap_tables.md" "$OUT/quickstart_ap.md"
[ -f "$QS/metrics.json" ] && tail -n 3 "$QS/metrics.json" > "$OUT/quickstart_metrics_tail.json"
if [ -f "$QS/model_final.pth" ]; then
  export CBAM_HRNET_QUICKSTART="$QS/model_final.pth"
  step eval_tests 120 $PY -m pytest -q -m cuda -k TestEvalOnCuda tests/test_cuda.py \
    -p no:cacheprovider
fi

{
  echo "{"
  first=1
  for name in "${!STATUS[@]}"; do
    [ $first -eq 1 ] || echo ","
    first=0
    printf '  "%s": {"exit": %d, "seconds": %d}' "$name" "${STATUS[$name]}" "${SECONDS_OF[$name]}"
  done
  echo
  echo "}"
} > "$OUT/gpu_check.json"
cat "$OUT/gpu_check.json"
