#!/usr/bin/env bash
# ad-hoc recipe sweep on the lent GPU (not committed)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export DETECTRON2_DATASETS=/tmp/ds
python3 -m cbam_hrnet_d2.data > $OUT/gen.log 2>&1 || { tail -30 $OUT/gen.log; exit 1; }
CFG=configs/shapes/mask_rcnn_CBAM_HRNet_W18_FPN_shapes.yaml
run() { name=$1; shift; python3 train_net.py --config-file $CFG OUTPUT_DIR /tmp/o/$name DATALOADER.NUM_WORKERS 3 "$@" > $OUT/$name.log 2>&1; cp /tmp/o/$name/ap_tables.md $OUT/$name.md 2>/dev/null; }
IFS=';' read -ra VARIANTS <<< "$SWEEP"
for v in "${VARIANTS[@]}"; do run $v & sleep 2; done
wait
for f in $OUT/*.md; do echo "== $f"; grep -A2 "AP " $f | grep -v -- "---" | cut -c1-60; done
