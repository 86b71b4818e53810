"""cbam_hrnet_d2: HRNet + CBAM backbone for Detectron2. Importing it registers the backbones."""

from . import backbone as _  # noqa: F401  (registers the two builders in BACKBONE_REGISTRY)
from . import roi_align as _roi  # noqa: F401  (registers SparseROIAlignROIHeads in ROI_HEADS_REGISTRY)
from .backbone import (
    CBAMFPN,
    CBAMHRNet,
    build_cbam_hrnet_backbone,
    build_cbam_hrnet_fpn_backbone,
)
from .cbam import CBAM
from .config import add_cbam_hrnet_config
from .roi_align import SparseROIAlign, SparseROIAlignROIHeads

__all__ = [
    "add_cbam_hrnet_config",
    "build_cbam_hrnet_backbone",
    "build_cbam_hrnet_fpn_backbone",
    "CBAMHRNet",
    "CBAMFPN",
    "CBAM",
    "SparseROIAlign",
    "SparseROIAlignROIHeads",
]
