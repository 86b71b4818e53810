"""cbam_hrnet_d2: HRNet + CBAM backbone for Detectron2. Importing it registers the backbones
(``build_cbam_hrnet_backbone``, ``build_cbam_hrnet_fpn_backbone``), the RPN (``CPUFastRPN``) and
the RoI heads (``CPUFastROIHeads``); ``cbam_hrnet_d2.data`` registers the shapes datasets."""

from cbam_hrnet_d2.config import add_cbam_hrnet_config, load_config
from cbam_hrnet_d2.modeling import (  # importing registers the backbones and heads
    CBAM,
    CBAMFPN,
    CBAMHRNet,
    CPUFastROIHeads,
    CPUFastRPN,
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
    "CPUFastRPN",
    "CPUFastROIHeads",
]
