"""The model: CBAM (:mod:`.cbam`), the HRNet trunk (:mod:`.hrnet`) and its ImageNet weights
(:mod:`.hrnet_weights`), the registered backbones (:mod:`.backbone`: they own the backbone's CPU
speed-ups), inference precision (:mod:`.precision`), and the registered RPN and RoI heads with the
head-scoped CPU speed-ups (:mod:`.heads`). Importing it registers the backbones and heads; the
meta-architecture stays detectron2's ``GeneralizedRCNN`` (or any other)."""

from cbam_hrnet_d2.modeling.backbone import (
    CBAMFPN,
    CBAMHRNet,
    HRNetFPN,
    build_cbam_hrnet_backbone,
    build_cbam_hrnet_fpn_backbone,
    hrnet_fpn,
)
from cbam_hrnet_d2.modeling.cbam import CBAM, record_attention
from cbam_hrnet_d2.modeling.heads import CPUFastROIHeads, CPUFastRPN

__all__ = [
    "CBAM",
    "record_attention",
    "CBAMHRNet",
    "HRNetFPN",
    "CBAMFPN",
    "hrnet_fpn",
    "build_cbam_hrnet_backbone",
    "build_cbam_hrnet_fpn_backbone",
    "CPUFastRPN",
    "CPUFastROIHeads",
]
