"""The CPU speed layer: what makes a built model and its process faster on a CPU, applied only
where the device is the CPU. The model code (:mod:`cbam_hrnet_d2.modeling`) does not depend on it;
a model built for CUDA is detectron2's standard Mask R-CNN with this backbone.

* :func:`apply_cpu_speedups` (``MODEL.CPU.*``), called on a built model by the trainer
  (``Trainer.build_model``), ``lazy_train_net.py`` (``train.cpu_speedups``), the demo, the export
  tool and the benchmark: ``CHANNELS_LAST`` (every conv's weights NHWC: oneDNN's fast layout),
  ``SPARSE_ROI_ALIGN`` (the poolers' RoIAlign as a multi-threaded sparse product,
  :mod:`.roi_align`), ``FOLD_BN`` (the HRNet trunk's BatchNorms folded into its convs in eval
  mode, :mod:`.fold_bn`) and ``BF16_HEADS`` (the RPN, box and mask heads in bf16 where
  ``TEST.PRECISION`` runs bf16, :mod:`.bf16_heads`). Same outputs up to float (or bf16) rounding;
  what each buys is measured in docs/benchmark.md.
* :mod:`.process`: threads per process, glibc keeping large blocks in its heap, DDP over gloo.
"""

import logging

import torch
from detectron2.config import CfgNode
from torch import nn

from cbam_hrnet_d2.cpu.bf16_heads import bf16_heads as run_heads_in_bf16
from cbam_hrnet_d2.cpu.fold_bn import FoldedTrunk
from cbam_hrnet_d2.cpu.roi_align import SparseROIAlign, use_sparse_roi_align
from cbam_hrnet_d2.modeling.backbone import CBAMHRNet

__all__ = ["apply_cpu_speedups", "cpu_speedups", "SparseROIAlign", "use_sparse_roi_align"]

logger = logging.getLogger(__name__)


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
    as detectron2's own backbones)."""
    if bf16_heads:
        precision = getattr(getattr(model, "backbone", None), "precision", "fp32")
        hooked = run_heads_in_bf16(model, precision)
        if hooked:
            logger.info("Heads in bf16 (TEST.PRECISION %s): %s", precision, ", ".join(hooked))
    if sparse_roi_align:
        use_sparse_roi_align(model)
    if fold_bn:
        for m in model.modules():
            if isinstance(m, CBAMHRNet):
                m.eval_trunk = FoldedTrunk()
    if channels_last:
        model.to(memory_format=torch.channels_last)  # 4-D tensors only: conv weights
    return model


def apply_cpu_speedups(model: nn.Module, cfg) -> nn.Module:
    """:func:`cpu_speedups` with the config's switches when its device is "cpu"; ``model``
    untouched on any other device. ``cfg`` is a YAML config (``MODEL.DEVICE``, ``MODEL.CPU.*``) or
    a LazyConfig (``train.device``, ``train.cpu_speedups``: keyword arguments of
    :func:`cpu_speedups`, all on when absent)."""
    if isinstance(cfg, CfgNode):
        device, on = cfg.MODEL.DEVICE, cfg.MODEL.CPU
        switches = {
            "channels_last": on.CHANNELS_LAST,
            "sparse_roi_align": on.SPARSE_ROI_ALIGN,
            "fold_bn": on.FOLD_BN,
            "bf16_heads": on.BF16_HEADS,
        }
    else:
        device, switches = cfg.train.device, dict(cfg.train.get("cpu_speedups", {}))
    if device != "cpu":
        return model
    logger.info("CPU speed-ups: %s", switches or "all on")
    return cpu_speedups(model, **switches)
