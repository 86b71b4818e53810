"""CPUFastROIHeads (MODEL.ROI_MASK_HEAD.POSITIVES_PER_IMAGE): the mask head trains on at most k
positives per image; 0 is detectron2's StandardROIHeads; bad values name the key."""

import unittest

import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from cbam_hrnet_d2.testing import synthetic_batch

from .common import get_config
from .test_training import CONFIG

CAPPED = ["MODEL.ROI_HEADS.NAME", "CPUFastROIHeads"]


class TestMaskPositivesPerImage(unittest.TestCase):
    def _mask_head_rois(self, k):
        torch.manual_seed(0)
        cfg = get_config(CONFIG, [*CAPPED, "MODEL.ROI_MASK_HEAD.POSITIVES_PER_IMAGE", k])
        model = build_model(cfg).train()
        seen = []
        model.roi_heads.mask_head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
        with EventStorage():
            losses = model(synthetic_batch(2, 128, 160, 8))
        self.assertTrue(torch.isfinite(losses["loss_mask"]))
        return seen[0]

    def test_the_mask_head_trains_on_at_most_k_positives_per_image(self):
        everything = self._mask_head_rois(0)
        self.assertGreater(everything, 2 * 3)  # 8 boxes per image: at least 8 positives each
        self.assertEqual(self._mask_head_rois(3), 2 * 3)
        self.assertEqual(self._mask_head_rois(1000), everything)

    def test_bad_values_name_the_key(self):
        cfg = get_config(CONFIG, [*CAPPED, "MODEL.ROI_MASK_HEAD.POSITIVES_PER_IMAGE", -1])
        with self.assertRaisesRegex(
            ValueError, r"MODEL.ROI_MASK_HEAD.POSITIVES_PER_IMAGE must be an integer >= 0"
        ):
            build_model(cfg)
        # a non-integer is refused when the config is read (the key's type), naming the key
        with self.assertRaisesRegex(ValueError, r"MODEL.ROI_MASK_HEAD.POSITIVES_PER_IMAGE"):
            get_config(CONFIG, ["MODEL.ROI_MASK_HEAD.POSITIVES_PER_IMAGE", 1.5])
