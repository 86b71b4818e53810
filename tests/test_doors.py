"""Every door of detectron2 builds the same model: on the CPU, ``build_model``,
``DefaultPredictor``, the trainer's ``build_model`` and a LazyConfig's ``instantiate(cfg.model)``
return the registered meta-architecture with the CPU speed layer, and with the same weights give
the same detections."""

import os
import tempfile
import unittest

import numpy as np
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import DefaultPredictor
from detectron2.modeling import GeneralizedRCNN, build_model

from cbam_hrnet_d2.engine import Trainer

from .common import CONFIGS, SHAPES_CONFIG, get_config
from .test_cpu_speedups import layer_state

# fp32 and score threshold 0: a random-init model gives its full TEST.DETECTIONS_PER_IMAGE
OPTS = ["TEST.PRECISION", "fp32", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0]


def detections(instances):
    return {
        "boxes": instances.pred_boxes.tensor,
        "scores": instances.scores,
        "classes": instances.pred_classes,
        "masks": instances.pred_masks,
    }


def assert_same_detections(test, got, want):
    """The same detections up to float rounding (the multi-threaded sparse RoIAlign may sum in
    another order from call to call): boxes and scores within torch's float32 tolerance, the same
    classes, pasted masks differing in at most 0.1% of their pixels."""
    test.assertEqual(len(got["scores"]), len(want["scores"]))
    torch.testing.assert_close(got["boxes"], want["boxes"])
    torch.testing.assert_close(got["scores"], want["scores"])
    test.assertTrue(torch.equal(got["classes"], want["classes"]))
    flipped = (got["masks"] != want["masks"]).float().mean().item()
    test.assertLessEqual(flipped, 1e-3)


class TestEveryDoorBuildsTheSameModel(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        cls.cfg = get_config(SHAPES_CONFIG, OPTS)
        cls.trainers = Trainer.build_model(cls.cfg).eval()  # what Trainer.__init__ builds
        cls.tmp = tempfile.TemporaryDirectory()
        cls.weights = os.path.join(cls.tmp.name, "model.pth")
        torch.save({"model": cls.trainers.state_dict()}, cls.weights)
        cls.image = (np.random.RandomState(0).rand(128, 160, 3) * 255).astype(np.uint8)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def run_as_predictor(self, predictor, model):
        """``predictor``'s resize and format, ``model``'s forward."""
        predictor.model = model
        return detections(predictor(self.image)["instances"])

    def assert_same_model(self, model):
        self.assertIs(type(model), GeneralizedRCNN)
        self.assertEqual(layer_state(model), layer_state(self.trainers))
        self.assertTrue(all(layer_state(model).values()), layer_state(model))

    def test_default_predictor_has_the_layer_and_the_trainers_outputs(self):
        cfg = self.cfg.clone()
        cfg.MODEL.WEIGHTS = self.weights
        predictor = DefaultPredictor(cfg)
        self.assert_same_model(predictor.model)
        ours = self.run_as_predictor(predictor, predictor.model)
        theirs = self.run_as_predictor(predictor, self.trainers)
        self.assertEqual(len(ours["scores"]), self.cfg.TEST.DETECTIONS_PER_IMAGE)
        assert_same_detections(self, ours, theirs)

    def test_build_model_and_a_lazyconfig_give_the_same_model(self):
        torch.manual_seed(1)
        built = build_model(self.cfg)
        lazy = LazyConfig.load(
            os.path.join(CONFIGS, "lazy", "mask_rcnn_cbam_hrnet_w18_fpn_shapes.py")
        )
        lazy.train.device = "cpu"
        lazy.model.backbone.precision = "fp32"
        instantiated = instantiate(lazy.model).to(lazy.train.device)
        predictor = DefaultPredictor(self.cfg)
        reference = self.run_as_predictor(predictor, self.trainers)
        for name, model in (("build_model", built), ("LazyConfig", instantiated)):
            with self.subTest(door=name):
                self.assert_same_model(model)
                model.load_state_dict(self.trainers.state_dict())
                model.roi_heads.box_predictor.test_score_thresh = 0.0
                out = self.run_as_predictor(predictor, model.eval())
                assert_same_detections(self, out, reference)
