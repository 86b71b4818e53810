"""Inputs and statistics for tests and measurements of random-init models, as
``detectron2.utils.testing`` gives them for its own: reproducible training batches
(:func:`synthetic_batch`) and norm statistics that keep a random-init model's activations finite
(:func:`calibrate_norm_statistics`). Generators of their own; the global RNG is left alone."""

import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.structures import BitMasks, Boxes, Instances

__all__ = ["calibrate_norm_statistics", "synthetic_batch"]


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
    with torch.no_grad():
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
