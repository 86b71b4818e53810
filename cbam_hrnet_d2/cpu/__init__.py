"""The CPU speed layer: what makes a model and its process faster on a CPU. It depends on no model
code; the model decides at build time whether to take it
(:class:`cbam_hrnet_d2.modeling.meta_arch.GeneralizedRCNNWithCPULayer`: where ``MODEL.DEVICE`` is
"cpu", with the switches of ``MODEL.CPU.*``), so that ``build_model``, ``DefaultPredictor``, the
trainer and LazyConfig's ``instantiate`` return the same model. A model built for CUDA is
detectron2's standard Mask R-CNN with this backbone.

* :func:`cpu_speedups`: ``CHANNELS_LAST`` (every conv's weights NHWC: oneDNN's fast layout),
  ``SPARSE_ROI_ALIGN`` (the poolers' RoIAlign as a multi-threaded sparse product,
  :mod:`.roi_align`), ``FOLD_BN`` (the HRNet trunk's BatchNorms folded into its convs in eval
  mode, :mod:`.fold_bn`) and ``BF16_HEADS`` (the RPN, box and mask heads in bf16 where
  ``TEST.PRECISION`` runs bf16, :mod:`.bf16_heads`). Same outputs up to float (or bf16) rounding;
  what each buys is measured in docs/benchmark.md.
* :mod:`.process`: threads per process, glibc keeping large blocks in its heap, DDP over gloo.
"""

import logging

import torch
from torch import nn

from cbam_hrnet_d2.cpu.bf16_heads import bf16_heads as run_heads_in_bf16
from cbam_hrnet_d2.cpu.fold_bn import FoldedTrunk
from cbam_hrnet_d2.cpu.roi_align import SparseROIAlign, use_sparse_roi_align

__all__ = ["CPU_SPEEDUPS", "cpu_speedups", "SparseROIAlign", "use_sparse_roi_align"]

logger = logging.getLogger(__name__)

# the switches of :func:`cpu_speedups` (MODEL.CPU.<NAME upper-cased>), all on by default
CPU_SPEEDUPS = ("channels_last", "sparse_roi_align", "fold_bn", "bf16_heads")


def cpu_speedups(
    model: nn.Module,
    *,
    channels_last: bool = True,
    sparse_roi_align: bool = True,
    fold_bn: bool = True,
    bf16_heads: bool = True,
) -> nn.Module:
    """Apply the CPU speed-ups to ``model`` in place (see the module doc); returns ``model``. The
    heads follow the precision of ``model.backbone`` (``TEST.PRECISION``; fp32 where it has none,
    as detectron2's own backbones). ``fold_bn`` acts on every submodule with an ``eval_trunk``
    slot (:class:`~cbam_hrnet_d2.modeling.backbone.CBAMHRNet`)."""
    if bf16_heads:
        precision = getattr(getattr(model, "backbone", None), "precision", "fp32")
        hooked = run_heads_in_bf16(model, precision)
        if hooked:
            logger.info("Heads in bf16 (TEST.PRECISION %s): %s", precision, ", ".join(hooked))
    if sparse_roi_align:
        use_sparse_roi_align(model)
    if fold_bn:
        for m in model.modules():
            if hasattr(m, "eval_trunk"):
                m.eval_trunk = FoldedTrunk()
    if channels_last:
        model.to(memory_format=torch.channels_last)  # 4-D tensors only: conv weights
    return model
