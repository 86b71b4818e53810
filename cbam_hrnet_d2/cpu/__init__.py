"""The CPU speed-ups: what makes a model and its process faster on a CPU. This project's model takes
them where they act, each decided per call from the device of the tensors it gets: the backbone
(:class:`~cbam_hrnet_d2.modeling.backbone.CBAMHRNet`: channels-last; the FPN's precision), the
RPN and RoI heads (:mod:`cbam_hrnet_d2.modeling.heads`: sparse RoIAlign, bf16 heads), switched by
``MODEL.CBAM_HRNET.CPU.*``. A model built on the CPU and moved to CUDA runs detectron2's CUDA path,
and the other way round.

* :func:`cpu_speedups`: the same treatment for any other detectron2 model (the benchmark's
  ``R50+cpu_speedups`` rows): ``channels_last`` (conv weights NHWC), ``sparse_roi_align``
  (:mod:`.roi_align`), ``bf16_heads`` (:mod:`.bf16_heads`).
* :mod:`.process`: threads per process, glibc keeping large blocks in its heap, DDP over gloo.
"""

import logging

import torch
from torch import nn

from cbam_hrnet_d2.cpu.bf16_heads import bf16_heads as run_heads_in_bf16
from cbam_hrnet_d2.cpu.roi_align import SparseROIAlign, use_sparse_roi_align

__all__ = ["CPU_SPEEDUPS", "cpu_speedups", "SparseROIAlign", "use_sparse_roi_align"]

logger = logging.getLogger(__name__)

# the switches of :func:`cpu_speedups`
CPU_SPEEDUPS = ("channels_last", "sparse_roi_align", "bf16_heads")


def cpu_speedups(
    model: nn.Module,
    *,
    channels_last: bool = True,
    sparse_roi_align: bool = True,
    bf16_heads: bool = True,
) -> nn.Module:
    """Apply the CPU speed-ups to any detectron2 ``model`` in place (see the module doc); returns
    ``model``. The heads follow the precision of ``model.backbone`` (``TEST.PRECISION``; fp32 where
    it has none, as detectron2's own backbones). ``channels_last`` converts the conv weights, which
    stay so after ``.to()``: for CPU-only models (this project's backbone decides per call)."""
    if bf16_heads:
        precision = getattr(getattr(model, "backbone", None), "precision", "fp32")
        hooked = run_heads_in_bf16(model, precision)
        if hooked:
            logger.info("Heads in bf16 (TEST.PRECISION %s): %s", precision, ", ".join(hooked))
    if sparse_roi_align:
        use_sparse_roi_align(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)  # 4-D tensors only: conv weights
    return model
