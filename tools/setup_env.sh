#!/usr/bin/env bash
# Idempotent set-up: creates .venv at the repo root with every pinned dependency (requirements.txt),
# detectron2 from the sal-detectron2 wheel, and this repo installed in editable mode.
# A stamp file holds the hash of the inputs; when it matches, set-up is a no-op that takes well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY=${PYTHON:-python3}
D2_VERSION=0.7.2
STAMP="$VENV/.cbam_hrnet_d2_setup"
want=$(cat requirements.txt pyproject.toml tools/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
echo "[setup] creating/updating $VENV (first time: a few minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
# pip, minus the warnings about this machine's local package mirrors that do not exist
pip_q() { "$VPY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
pip_q install -q --upgrade "pip<26"
pip_q install -q -r requirements.txt
# detectron2: the wheel is tagged cp310 only but is pure Python apart from an optional _C extension.
if ! "$VPY" -c "import importlib.metadata as m; assert m.version('sal-detectron2') == '$D2_VERSION'" 2>/dev/null; then
  tmp=$(mktemp -d)
  pip_q download -q --no-deps --only-binary=:all: --python-version 3.10 \
    "sal-detectron2==$D2_VERSION" -d "$tmp"
  whl=$(ls "$tmp"/sal_detectron2-*.whl | head -n 1)
  mv "$whl" "$tmp/sal_detectron2-$D2_VERSION-py3-none-any.whl"
  # --no-deps: its declared requirements are pinned in requirements.txt already.
  pip_q install -q --no-deps "$tmp/sal_detectron2-$D2_VERSION-py3-none-any.whl"
  rm -rf "$tmp"
fi
# this repo, editable, with the [deploy] and [openvino] extras (onnx, onnxruntime, openvino:
# tools/export_model.py and its tests); requirements.txt as constraints keeps numpy < 2
pip_q install -q -e ".[deploy,openvino]" -c requirements.txt
"$VPY" -c "import detectron2, timm, torch, onnxruntime, openvino, cbam_hrnet_d2; print('[setup] ok: torch', torch.__version__, 'detectron2', detectron2.__version__, 'timm', timm.__version__, 'onnxruntime', onnxruntime.__version__, 'openvino', openvino.__version__)"
echo "$want" > "$STAMP"
