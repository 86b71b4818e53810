#!/usr/bin/env bash
# Placeholder until the training recipe lands: build the default model and run one forward pass.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -c "
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from cbam_hrnet_d2 import add_cbam_hrnet_config
cfg = get_cfg(); add_cbam_hrnet_config(cfg)
cfg.merge_from_file('configs/mask_rcnn_CBAM_HRNet_W18_FPN_1x.yaml'); cfg.MODEL.DEVICE = 'cpu'
model = build_model(cfg).eval()
with torch.no_grad():
    out = model([{'image': torch.rand(3, 256, 320) * 255}])
print('forward ok:', len(out[0]['instances']), 'instances')
"
