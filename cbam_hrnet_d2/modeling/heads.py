"""This project's RPN and RoI heads: detectron2's ``RPN`` and ``StandardROIHeads``, registered
(``PROPOSAL_GENERATOR_REGISTRY``, ``ROI_HEADS_REGISTRY``) the way PointRend registers its own, with
the head-scoped CPU speed-ups of :mod:`cbam_hrnet_d2.cpu`, each decided per call from the device of
the tensors the head gets (a model built for one device and moved with ``.to()`` runs what its new
device should; on CUDA they are detectron2's heads):

* ``MODEL.CBAM_HRNET.CPU.SPARSE_ROI_ALIGN``: the poolers' RoIAlign as a multi-threaded sparse
  product on CPU features (:class:`~cbam_hrnet_d2.cpu.SparseROIAlign`; torchvision's kernel on
  CUDA and in graph capture);
* ``MODEL.CBAM_HRNET.CPU.BF16_HEADS``: the RPN, box and mask heads under bf16 autocast on CPU inputs
  in eval mode where ``TEST.PRECISION`` runs bf16 (:mod:`cbam_hrnet_d2.cpu.bf16_heads`);

and, in training, a cap on the mask head's positives (``MODEL.ROI_MASK_HEAD.POSITIVES_PER_IMAGE``).
"""

import logging

import torch
from detectron2.config import configurable
from detectron2.modeling import PROPOSAL_GENERATOR_REGISTRY, ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.proposal_generator import RPN
from detectron2.modeling.roi_heads import select_foreground_proposals

from cbam_hrnet_d2.cpu.bf16_heads import autocast_on_cpu, heads_dtype
from cbam_hrnet_d2.cpu.roi_align import use_sparse_roi_align
from cbam_hrnet_d2.modeling.precision import check_precision

__all__ = ["CPUFastRPN", "CPUFastROIHeads"]

logger = logging.getLogger(__name__)


def _bf16_on_cpu(precision: str, *heads) -> bool:
    """Hook ``heads`` (modules or None) to run in bf16 on CPU inputs where ``precision`` does;
    True where it did."""
    check_precision(precision)  # the value; the backbone checks fp16 against the device
    dtype = heads_dtype(precision)
    if dtype is None:
        return False
    for head in heads:
        if head is not None:
            autocast_on_cpu(head, dtype)
    return True


@PROPOSAL_GENERATOR_REGISTRY.register()
class CPUFastRPN(RPN):
    """detectron2's :class:`RPN` whose head runs in bf16 on CPU inputs in eval mode where
    ``precision`` runs bf16 (``MODEL.CBAM_HRNET.CPU.BF16_HEADS``); otherwise that RPN."""

    @configurable
    def __init__(self, *, bf16_heads: bool = False, precision: str = "fp32", **kwargs):
        """
        Args:
            bf16_heads (bool): run the RPN head in bf16 on CPU inputs where ``precision`` does.
            precision (str): ``TEST.PRECISION``.
            kwargs: arguments of :class:`RPN`.
        """
        super().__init__(**kwargs)
        self.bf16_heads = bf16_heads
        # whether the head was hooked: the switch, and a precision that runs bf16 on this CPU
        self.bf16_on_cpu = bf16_heads and _bf16_on_cpu(precision, self.rpn_head)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["bf16_heads"] = cfg.MODEL.CBAM_HRNET.CPU.BF16_HEADS
        ret["precision"] = cfg.TEST.PRECISION
        return ret


@ROI_HEADS_REGISTRY.register()
class CPUFastROIHeads(StandardROIHeads):
    """detectron2's :class:`StandardROIHeads` with the CPU speed-ups of the module doc, decided per
    call, and a cap on the mask head's training positives: it trains on at most
    ``mask_positives_per_image`` of each image's foreground proposals, drawn at random
    (``torch.randperm``, so seeded runs repeat); the box head still sees all of them, and
    inference is unchanged. Mask-head work is proportional to the number of positives, which grows
    as the RPN learns (in the shapes recipe it reached ~32 per image and half of a training step).
    With every option off it is ``StandardROIHeads``."""

    @configurable
    def __init__(
        self,
        *,
        mask_positives_per_image: int = 0,
        sparse_roi_align: bool = False,
        bf16_heads: bool = False,
        precision: str = "fp32",
        **kwargs,
    ):
        """
        Args:
            mask_positives_per_image (int): cap on the mask head's training positives per image;
                0 = every foreground proposal.
            sparse_roi_align (bool): the poolers' RoIAlign as a sparse product on CPU features.
            bf16_heads (bool): box and mask heads in bf16 on CPU inputs where ``precision`` does.
            precision (str): ``TEST.PRECISION``.
            kwargs: arguments of :class:`StandardROIHeads`.
        """
        super().__init__(**kwargs)
        if not isinstance(mask_positives_per_image, int) or mask_positives_per_image < 0:
            raise ValueError(
                "MODEL.ROI_MASK_HEAD.POSITIVES_PER_IMAGE must be an integer >= 0 (0 = every "
                f"foreground proposal), got {mask_positives_per_image!r}."
            )
        self.mask_positives_per_image = mask_positives_per_image
        if sparse_roi_align:
            use_sparse_roi_align(self)
        heads = (getattr(self, "box_head", None), getattr(self, "mask_head", None))
        self.bf16_heads = bf16_heads
        self.bf16_on_cpu = bf16_heads and _bf16_on_cpu(precision, *heads)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["mask_positives_per_image"] = cfg.MODEL.ROI_MASK_HEAD.POSITIVES_PER_IMAGE
        ret["sparse_roi_align"] = cfg.MODEL.CBAM_HRNET.CPU.SPARSE_ROI_ALIGN
        ret["bf16_heads"] = cfg.MODEL.CBAM_HRNET.CPU.BF16_HEADS
        ret["precision"] = cfg.TEST.PRECISION
        return ret

    def _forward_mask(self, features, instances):
        # (the one method detectron2 offers for what the mask head trains on)
        k = self.mask_positives_per_image
        if self.training and self.mask_on and k > 0:
            instances, _ = select_foreground_proposals(instances, self.num_classes)
            # drawn on the RoIs' device: no host round trip for CUDA RoIs
            instances = [
                x[torch.randperm(len(x), device=x.proposal_boxes.device)[:k]] if len(x) > k else x
                for x in instances
            ]
        return super()._forward_mask(features, instances)
