"""Checkpoints: safe loading and atomic saving (:mod:`.checkpointer`), ImageNet HRNet weights for
the trunk (:mod:`.hrnet_weights`)."""

from cbam_hrnet_d2.checkpoint.checkpointer import (
    MISSING_WEIGHTS_HINT,
    SafeCheckpointer,
    load_tensor_file,
)
from cbam_hrnet_d2.checkpoint.hrnet_weights import convert_hrnet_weights, load_pretrained_trunk

__all__ = [
    "SafeCheckpointer",
    "load_tensor_file",
    "MISSING_WEIGHTS_HINT",
    "load_pretrained_trunk",
    "convert_hrnet_weights",
]
