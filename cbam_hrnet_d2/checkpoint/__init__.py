"""Checkpoints: safe loading and atomic saving (:mod:`.checkpointer`). ImageNet HRNet weights for
the trunk are read at build time by :mod:`cbam_hrnet_d2.modeling.hrnet_weights`."""

from cbam_hrnet_d2.checkpoint.checkpointer import (
    MISSING_WEIGHTS_HINT,
    SafeCheckpointer,
    load_tensor_file,
)

__all__ = [
    "SafeCheckpointer",
    "load_tensor_file",
    "MISSING_WEIGHTS_HINT",
]
