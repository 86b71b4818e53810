"""The model: CBAM (:mod:`.cbam`), the HRNet trunk (:mod:`.hrnet`) and its ImageNet weights
(:mod:`.hrnet_weights`), the registered backbones (:mod:`.backbone`), inference precision
(:mod:`.precision`), the RoI heads with a cap on the mask head's training positives
(:mod:`.roi_heads`) and the meta-architecture that takes the CPU speed layer on a CPU
(:mod:`.meta_arch`). Importing it registers the backbones, the RoI heads and the
meta-architecture."""

from cbam_hrnet_d2.modeling.backbone import (
    CBAMFPN,
    CBAMHRNet,
    HRNetFPN,
    build_cbam_hrnet_backbone,
    build_cbam_hrnet_fpn_backbone,
    hrnet_fpn,
)
from cbam_hrnet_d2.modeling.cbam import CBAM, record_attention
from cbam_hrnet_d2.modeling.meta_arch import GeneralizedRCNNWithCPULayer
from cbam_hrnet_d2.modeling.roi_heads import CappedMaskROIHeads

__all__ = [
    "CBAM",
    "record_attention",
    "CBAMHRNet",
    "HRNetFPN",
    "CBAMFPN",
    "hrnet_fpn",
    "build_cbam_hrnet_backbone",
    "build_cbam_hrnet_fpn_backbone",
    "CappedMaskROIHeads",
    "GeneralizedRCNNWithCPULayer",
]
