"""cbam_hrnet_d2: HRNet + CBAM backbone for Detectron2. Importing it registers the backbones
(``build_cbam_hrnet_backbone``, ``build_cbam_hrnet_fpn_backbone``), the RoI heads
(``CappedMaskROIHeads``) and the meta-architecture (``GeneralizedRCNNWithCPULayer``: the CPU speed
layer where MODEL.DEVICE is cpu); ``cbam_hrnet_d2.data`` registers the shapes datasets."""

from cbam_hrnet_d2.config import add_cbam_hrnet_config, load_config
from cbam_hrnet_d2.modeling import (  # importing registers the backbones and RoI heads
    CBAM,
    CBAMFPN,
    CappedMaskROIHeads,
    CBAMHRNet,
    GeneralizedRCNNWithCPULayer,
    build_cbam_hrnet_backbone,
    build_cbam_hrnet_fpn_backbone,
)

__all__ = [
    "add_cbam_hrnet_config",
    "load_config",
    "build_cbam_hrnet_backbone",
    "build_cbam_hrnet_fpn_backbone",
    "CBAMHRNet",
    "CBAMFPN",
    "CBAM",
    "CappedMaskROIHeads",
    "GeneralizedRCNNWithCPULayer",
]
