"""Random-init models made comparable: the same inputs and the same work for every backbone.

Used by ``tools/benchmark.py`` and the tests. A random-init detector proposes anything from no box
to its full top-k and its activations can overflow; these helpers fix both so that two backbones are
measured doing the same job. Boxes come from seeded generators of their own (the global RNG is left
alone) and keep the image's aspect ratio, which ``detectron2.utils.testing.random_boxes`` (global
RNG, one square range) does not.
"""

from typing import Sequence

import torch
from detectron2 import model_zoo
from detectron2.layers import FrozenBatchNorm2d
from detectron2.structures import BitMasks, Boxes, ImageList, Instances

from .config import load_config
from .fold_bn import batchnorm_unfolded

__all__ = [
    "REFERENCE",
    "load_cfg",
    "fixed_boxes",
    "FixedProposals",
    "FixedWork",
    "calibrate_norm_statistics",
    "synthetic_batch",
]

# detectron2's model-zoo config every measurement is compared with
REFERENCE = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"


def load_cfg(config: str, opts: Sequence[str] = ()):
    """``config`` (a file, or :data:`REFERENCE`) + ``opts`` on the CPU, without weights."""
    path = model_zoo.get_config_file(config) if config == REFERENCE else config
    cfg = load_config(path, opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def fixed_boxes(h: int, w: int, num: int) -> Boxes:
    """``num`` reproducible random boxes inside an (h, w) image, 8 px to 30% of each side."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(num, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    wh = torch.rand(num, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 8
    return Boxes(torch.cat([xy, xy + wh], 1))


class FixedProposals(torch.nn.Module):
    """A proposal generator whose losses are computed as usual but whose proposals are ``num`` fixed
    boxes per image (:func:`fixed_boxes`), so that the RoI heads of random-init models train on the
    same boxes."""

    def __init__(self, rpn: torch.nn.Module, num: int):
        super().__init__()
        self.rpn = rpn
        self.num = num

    def forward(self, images, features, gt_instances=None):
        _, losses = self.rpn(images, features, gt_instances)
        proposals = []
        for h, w in images.image_sizes:
            inst = Instances((h, w))
            boxes = fixed_boxes(h, w, self.num)
            boxes.clip((h, w))  # as the RPN clips its proposals
            inst.proposal_boxes = boxes.to(images.tensor.device)
            inst.objectness_logits = torch.zeros(self.num, device=images.tensor.device)
            proposals.append(inst)
        return proposals, losses


class FixedWork(torch.nn.Module):
    """The whole Mask R-CNN at test time with the box counts fixed, so that random-init models of
    different backbones do the same work: backbone + FPN, the RPN (its proposals discarded), the box
    head on ``num_proposals`` fixed boxes and the mask head on ``num_detections`` fixed boxes.
    (Final mask pasting into the image is left out.)"""

    def __init__(self, model, h: int, w: int, num_proposals: int = 1000, num_detections: int = 100):
        super().__init__()
        self.model = model
        self.boxes = fixed_boxes(h, w, num_proposals)
        self.num_detections = num_detections
        self.hw = (h, w)

    def forward(self, x: torch.Tensor):
        model, roi = self.model, self.model.roi_heads
        features = model.backbone(x)
        model.proposal_generator(ImageList(x, [self.hw]), features, None)
        box_features = roi.box_pooler([features[f] for f in roi.box_in_features], [self.boxes])
        scores, _ = roi.box_predictor(roi.box_head(box_features))
        inst = Instances(self.hw)
        inst.pred_boxes = self.boxes[: self.num_detections]
        inst.pred_classes = torch.zeros(self.num_detections, dtype=torch.long)
        masks = roi._forward_mask(features, [inst])
        return scores, masks[0].pred_masks


def calibrate_norm_statistics(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Set the running statistics of every (Frozen)BatchNorm from one forward pass over ``x``, in
    forward order. Random-init models then keep finite activations like pretrained ones do (a
    random-init R50 with FrozenBN overflows to NaN at 800 px and detectron2 aborts training)."""

    def set_stats(module, inputs):
        t = inputs[0].detach().float()
        module.running_mean.copy_(t.mean(dim=(0, 2, 3)))
        module.running_var.copy_(t.var(dim=(0, 2, 3)) + module.eps)

    handles = [
        m.register_forward_pre_hook(set_stats)
        for m in model.modules()
        if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d))
    ]
    was_training = model.training
    with batchnorm_unfolded(model), torch.no_grad():
        model.eval()(x)
    model.train(was_training)
    for h in handles:
        h.remove()


def synthetic_batch(batch: int, h: int, w: int, num_instances: int = 8, seed: int = 0):
    """``batch`` training inputs of (h, w) random pixels, each with ``num_instances`` boxes (32 px
    to a quarter of each side more) whose masks fill them, classes 0-2; reproducible by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        inst = Instances((h, w))
        xy = torch.rand(num_instances, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = torch.rand(num_instances, 2, generator=g) * torch.tensor([w * 0.25, h * 0.25]) + 32
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(num_instances, h, w, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[i, y0:y1, x0:x1] = True
        inst.gt_boxes, inst.gt_masks = Boxes(boxes), BitMasks(masks)
        inst.gt_classes = torch.randint(0, 3, (num_instances,), generator=g)
        out.append({"image": torch.rand(3, h, w, generator=g) * 255, "instances": inst})
    return out
