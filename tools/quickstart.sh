#!/usr/bin/env bash
# make quickstart: generate the embedded shapes dataset, train CBAM-HRNet-W18 Mask R-CNN on the CPU,
# evaluate (COCO box + mask AP), and draw prediction + attention pictures of a few val images.
# Extra arguments are passed to train_net.py as KEY VALUE overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${QUICKSTART_OUT:-output/quickstart}
CFG=configs/shapes/mask_rcnn_CBAM_HRNet_W18_FPN_shapes.yaml
DATA=${DETECTRON2_DATASETS:-datasets}
export PYTHONWARNINGS=ignore
start=$(date +%s)
mkdir -p "$OUT"

$PY -m cbam_hrnet_d2.data
TIME=()
if [ -x /usr/bin/time ]; then TIME=(/usr/bin/time -f "%M" -o "$OUT/peak_rss_kb.txt"); fi
"${TIME[@]}" $PY train_net.py --config-file "$CFG" OUTPUT_DIR "$OUT" "$@"
trained=$(date +%s)

$PY demo/demo.py --config-file "$CFG" --attention --output "$OUT/pictures" \
  --input "$DATA"/shapes/val/00000[0-3].png --opts MODEL.WEIGHTS "$OUT/model_final.pth"
end=$(date +%s)

echo
echo "== quickstart done in $(( (end - start) / 60 )) min $(( (end - start) % 60 )) s" \
  "(train + eval: $(( (trained - start) / 60 )) min $(( (trained - start) % 60 )) s)"
[ -f "$OUT/peak_rss_kb.txt" ] && echo "   peak RSS of training: $(( $(cat "$OUT/peak_rss_kb.txt") / 1024 )) MiB"
echo "   model:    $OUT/model_final.pth"
echo "   metrics:  $OUT/metrics.json"
echo "   AP:       $OUT/ap_tables.md"
echo "   pictures: $OUT/pictures/"
echo
cat "$OUT/ap_tables.md"
