"""RoI heads with a cap on the mask head's training positives (``MODEL.ROI_MASK_HEAD.
POSITIVES_PER_IMAGE``), used by the CPU shapes recipe."""

import torch
from detectron2.config import configurable
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads import select_foreground_proposals

__all__ = ["CappedMaskROIHeads"]


@ROI_HEADS_REGISTRY.register()
class CappedMaskROIHeads(StandardROIHeads):
    """detectron2's ``StandardROIHeads`` whose mask head trains on at most
    ``mask_positives_per_image`` of each image's foreground proposals, drawn at random
    (``torch.randperm``, so seeded runs repeat); the box head still sees all of them, and
    inference is unchanged. Mask-head work is proportional to the number of positives, which grows
    as the RPN learns: in the shapes recipe it reached ~32 per image and half of a training step
    (docs/cpu_recipe.md). 0 = every positive, i.e. detectron2's ``StandardROIHeads``."""

    @configurable
    def __init__(self, *, mask_positives_per_image: int = 0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(mask_positives_per_image, int) or mask_positives_per_image < 0:
            raise ValueError(
                "MODEL.ROI_MASK_HEAD.POSITIVES_PER_IMAGE must be an integer >= 0 (0 = every "
                f"foreground proposal), got {mask_positives_per_image!r}."
            )
        self.mask_positives_per_image = mask_positives_per_image

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["mask_positives_per_image"] = cfg.MODEL.ROI_MASK_HEAD.POSITIVES_PER_IMAGE
        return ret

    def _forward_mask(self, features, instances):
        k = self.mask_positives_per_image
        if self.training and self.mask_on and k > 0:
            instances, _ = select_foreground_proposals(instances, self.num_classes)
            # drawn on the RoIs' device: no host round trip for CUDA RoIs (the CPU stream of a CPU
            # run is the one it always was)
            instances = [
                x[torch.randperm(len(x), device=x.proposal_boxes.device)[:k]] if len(x) > k else x
                for x in instances
            ]
        return super()._forward_mask(features, instances)
