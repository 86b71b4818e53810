"""Our backbone inside Detectron2's own meta-architectures, as a user would put it there: the
shipped Cascade Mask R-CNN and PanopticFPN configs with only ``MODEL.BACKBONE.NAME`` and
``MODEL.FPN.IN_FEATURES`` swapped build, train a step and run inference on the CPU, and their
backbone is ours with the same per-call CPU path (so the same speed as in our own config)."""

import unittest

import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from cbam_hrnet_d2.config import detectron2_config_file, load_config
from cbam_hrnet_d2.modeling.backbone import CBAMHRNet
from cbam_hrnet_d2.modeling.hrnet import HRNET_FEATURES
from cbam_hrnet_d2.testing import calibrate_norm_statistics, synthetic_batch

from .common import get_config

CASCADE = "Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml"
PANOPTIC = "COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml"
# the two keys a user swaps (and no ImageNet R50 weights: nothing is downloaded)
SWAP = [
    "MODEL.BACKBONE.NAME", "build_cbam_hrnet_fpn_backbone",
    "MODEL.FPN.IN_FEATURES", list(HRNET_FEATURES),
    "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
]  # fmt: skip
H, W = 128, 160


def their_config(path):
    return load_config(detectron2_config_file(path), SWAP)


def batch(with_sem_seg):
    data = synthetic_batch(2, H, W, num_instances=3)
    if with_sem_seg:
        g = torch.Generator().manual_seed(1)
        for d in data:
            d["sem_seg"] = torch.randint(0, 54, (H, W), generator=g)
    return data


class TestDetectron2MetaArchsWithOurBackbone(unittest.TestCase):
    def check(self, path, meta_arch, with_sem_seg):
        torch.manual_seed(0)
        cfg = their_config(path)
        model = build_model(cfg)
        self.assertEqual(type(model).__name__, meta_arch)
        self.assertIsInstance(model.backbone.bottom_up, CBAMHRNet)
        calibrate_norm_statistics(model.backbone, torch.rand(1, 3, H, W) * 2 - 1)
        model.train()
        with EventStorage():
            losses = model(batch(with_sem_seg))
        total = sum(losses.values())
        self.assertTrue(torch.isfinite(total), losses)
        total.backward()
        grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
        self.assertTrue(grads and all(g is not None for g in grads))
        model.eval()
        with torch.no_grad():
            out = model([{"image": torch.rand(3, H, W) * 255}])[0]
        self.assertIn("instances", out)
        return model, out

    def test_cascade_mask_rcnn_trains_and_infers(self):
        model, _ = self.check(CASCADE, "GeneralizedRCNN", with_sem_seg=False)
        self.assertEqual(type(model.roi_heads).__name__, "CascadeROIHeads")

    def test_panoptic_fpn_trains_and_infers(self):
        _, out = self.check(PANOPTIC, "PanopticFPN", with_sem_seg=True)
        self.assertIn("panoptic_seg", out)
        self.assertIn("sem_seg", out)

    def test_their_backbone_runs_as_in_our_config(self):
        # the same module with the same CPU choices: the same outputs bit for bit, so the same
        # work (its time beside ours: tools/benchmark.py --backbone-of)
        torch.manual_seed(0)
        theirs = build_model(their_config(CASCADE)).backbone.eval()
        ours = build_model(get_config(opts=["MODEL.WEIGHTS", ""])).backbone.eval()
        bottom_up = theirs.bottom_up
        self.assertTrue(bottom_up.cpu_channels_last)
        self.assertEqual(theirs.precision, ours.precision)
        ours.load_state_dict(theirs.state_dict())
        x = torch.rand(1, 3, 256, 320) * 2 - 1
        with torch.no_grad():
            a, b = theirs(x), ours(x)
        for name in a:
            self.assertTrue(torch.equal(a[name], b[name]), name)
