"""Every runnable YAML loads, builds a GeneralizedRCNN on CPU, trains one step and predicts
masks."""

import os
import unittest

import torch
from detectron2.config import CfgNode as CN
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from cbam_hrnet_d2.config import add_cbam_hrnet_config, warn_if_frozen_norms_start_random
from cbam_hrnet_d2.testing import calibrate_norm_statistics

from .common import CONFIGS, DEFAULT_CONFIG, collect_config_files, get_config


def _prepare_random_model_for_eval(model):
    """Make a random-init model keep detections, so that the mask head runs at test time."""
    # A random-init trunk in eval mode with running stats (0, 1) overflows; estimate real statistics
    # first (BN and FrozenBN, whose statistics ImageNet weights would otherwise bring).
    calibrate_norm_statistics(model.backbone, torch.rand(2, 3, 128, 160))
    # Random box deltas would push every box outside the image: keep the proposals' boxes,
    # and accept every score.
    torch.nn.init.zeros_(model.roi_heads.box_predictor.bbox_pred.weight)
    torch.nn.init.zeros_(model.roi_heads.box_predictor.bbox_pred.bias)
    model.roi_heads.box_predictor.test_score_thresh = 0.0
    model.eval()


def _inputs(sizes=((200, 250), (200, 249)), num_instances=(3, 0)):
    batch = []
    for (h, w), n in zip(sizes, num_instances):
        inst = Instances((h, w))
        xy = torch.rand(n, 2) * torch.tensor([w / 2, h / 2])
        wh = torch.rand(n, 2) * 60 + 20
        boxes = torch.cat([xy, xy + wh], dim=1)
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(0, 3, (n,))
        masks = torch.zeros(n, h, w, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
            masks[i, y0:y1, x0:x1] = True
        inst.gt_masks = BitMasks(masks)
        batch.append({"image": torch.rand(3, h, w) * 255, "instances": inst})
    return batch


class TestRecipes(unittest.TestCase):
    """The COCO configs follow detectron2's R50 recipe (ImageNet init, stem + stage 1 frozen,
    FrozenBN); *_scratch and the shapes recipe train every stage from random init."""

    def test_coco_recipe_freezes_stem_and_stage1_and_uses_frozen_bn(self):
        cfg = get_config()
        self.assertEqual((cfg.MODEL.BACKBONE.FREEZE_AT, cfg.MODEL.CBAM_HRNET.NORM), (2, "FrozenBN"))
        trunk = build_model(cfg).backbone.bottom_up.trunk
        norms = [m for m in trunk.modules() if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d))]
        self.assertTrue(norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms))
        for name, p in trunk.named_parameters():
            frozen = name.split(".")[0] in ("conv1", "conv2", "layer1")
            self.assertEqual(p.requires_grad, not frozen, name)

    def test_scratch_and_shapes_recipes_train_everything_from_random_init(self):
        for path, norm in (
            (os.path.join(CONFIGS, "mask_rcnn_CBAM_HRNet_W18_FPN_1x_scratch.yaml"), "SyncBN"),
            (os.path.join(CONFIGS, "shapes", "mask_rcnn_CBAM_HRNet_W18_FPN_shapes.yaml"), "GN"),
        ):
            with self.subTest(config=os.path.basename(path)):
                cfg = get_config(path)
                self.assertEqual(
                    (cfg.MODEL.WEIGHTS, cfg.MODEL.BACKBONE.FREEZE_AT, cfg.MODEL.CBAM_HRNET.NORM),
                    ("", 0, norm),
                )
                self.assertFalse(warn_if_frozen_norms_start_random(cfg))
                # off on every device
                self.assertFalse(cfg.MODEL.CBAM_HRNET.ACTIVATION_CHECKPOINTING)
                trunk = build_model(cfg).backbone.bottom_up.trunk
                self.assertTrue(all(p.requires_grad for p in trunk.parameters()))

    def test_frozen_norms_without_weights_are_warned_about(self):
        self.assertFalse(warn_if_frozen_norms_start_random(get_config()))
        with self.assertLogs("cbam_hrnet_d2.config", "WARNING") as logs:
            self.assertTrue(
                warn_if_frozen_norms_start_random(get_config(opts=["MODEL.WEIGHTS", ""]))
            )
        self.assertIn("MODEL.CBAM_HRNET.NORM SyncBN", "\n".join(logs.output))
        self.assertFalse(
            warn_if_frozen_norms_start_random(
                get_config(opts=["MODEL.WEIGHTS", "", "MODEL.CBAM_HRNET.PRETRAINED", "in1k.pth"])
            )
        )


class TestEveryConfig(unittest.TestCase):
    def test_configs_exist(self):
        self.assertGreaterEqual(len(collect_config_files()), 6)

    def test_every_config_builds_trains_one_step_and_predicts_masks(self):
        for path in collect_config_files():
            with self.subTest(config=os.path.relpath(path)):
                torch.manual_seed(0)
                cfg = get_config(path)
                cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
                model = build_model(cfg)
                self.assertIsInstance(model, GeneralizedRCNN)
                model.train()
                with EventStorage():
                    losses = model(_inputs())
                    total = sum(losses.values())
                    self.assertTrue(all(torch.isfinite(v) for v in losses.values()), losses)
                    total.backward()
                self.assertIn("loss_mask", losses)
                _prepare_random_model_for_eval(model)
                with torch.no_grad():
                    out = model([{"image": torch.rand(3, 200, 249) * 255}])
                inst = out[0]["instances"]
                self.assertTrue(inst.has("pred_masks"))
                self.assertGreater(len(inst), 0)
                self.assertEqual(tuple(inst.pred_masks.shape[1:]), (200, 249))

    def test_poolers_output_7x7_boxes_and_14x14_masks(self):
        cfg = get_config()
        model = build_model(cfg)
        _prepare_random_model_for_eval(model)
        seen = {}

        def hook(name):
            def record(module, inputs, output):
                seen[name] = tuple(output.shape[-2:])

            return record

        model.roi_heads.box_pooler.register_forward_hook(hook("box"))
        model.roi_heads.mask_pooler.register_forward_hook(hook("mask"))
        with torch.no_grad():
            model([{"image": torch.rand(3, 128, 160) * 255}])
        self.assertEqual(seen, {"box": (7, 7), "mask": (14, 14)})
        self.assertEqual(cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION, 7)
        self.assertEqual(cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION, 14)


def _densepose_like_hrnet_config(cfg):
    """What DensePose's ``add_hrnet_config`` does to a config (densepose/config.py): creates
    ``MODEL.HRNET`` with its HRFPN keys (DensePose is not installed here: its node only)."""
    cfg.MODEL.HRNET = CN()
    cfg.MODEL.HRNET.STEM_INPLANES = 64
    cfg.MODEL.HRNET.HRFPN = CN()
    cfg.MODEL.HRNET.HRFPN.OUT_CHANNELS = 256


def _d2go_like_ema_config(cfg):
    """What d2go's ``add_model_ema_configs`` does: a top-level ``MODEL_EMA`` node."""
    cfg.MODEL_EMA = CN()
    cfg.MODEL_EMA.ENABLED = False
    cfg.MODEL_EMA.DECAY = 0.9998


class TestKeysBesideOtherProjects(unittest.TestCase):
    """Our keys live in our own nodes: another project's add_*_config before or after ours keeps
    both sets of keys."""

    def test_ours_and_densepose_d2go_pointrend_keys_survive_either_order(self):
        from detectron2.config import get_cfg
        from detectron2.projects.point_rend import add_pointrend_config

        others = (_densepose_like_hrnet_config, _d2go_like_ema_config, add_pointrend_config)
        for ours_first in (True, False):
            with self.subTest(ours_first=ours_first):
                cfg = get_cfg()
                steps = [add_cbam_hrnet_config, *others]
                for add in steps if ours_first else steps[::-1]:
                    add(cfg)
                self.assertEqual(cfg.MODEL.HRNET.STEM_INPLANES, 64)
                self.assertEqual(cfg.MODEL_EMA.DECAY, 0.9998)
                self.assertIn("POINT_HEAD", cfg.MODEL)
                self.assertEqual(cfg.MODEL.CBAM_HRNET.WIDTH, 18)
                self.assertFalse(cfg.CBAM_HRNET.EMA.ENABLED)
                self.assertEqual(cfg.CBAM_HRNET.RUN_LOCK.LEASE_SECONDS, 180.0)
                cfg.merge_from_file(DEFAULT_CONFIG)  # and our YAML still merges
