"""Training options of the quickstart recipe: INPUT.HARD_AUG (each corruption keeps boxes and
masks right: occlusion removes the painted pixels from the masks, the stretch moves boxes with the
masks, photometric ones change pixels only; START_ITER holds them back to an iteration, also after a
resume without replay), MODEL.ROI_MASK_HEAD.POSITIVES_PER_IMAGE (the mask head
trains on at most that many proposals per image; 0 is detectron2's), and tools/corrupt_dataset.py
(the hard evaluation set written by other code)."""

import json
import os
import tempfile
import unittest
from types import SimpleNamespace

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.engine import hooks
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

from cbam_hrnet_d2.data import (
    augment,
    check_datasets,
    generate_shapes,
    register_coco_json,
    register_from_cfg,
    validate_coco_json,
)
from cbam_hrnet_d2.data.build import RobustDatasetMapper, build_train_loader
from cbam_hrnet_d2.engine.hooks import PreciseBN
from cbam_hrnet_d2.engine.resume import ExactResume, ResumableLoader, capture_rng_state

from .common import CONFIGS, get_config, load_tool
from .test_training import CONFIG

SHAPES = os.path.join(CONFIGS, "shapes", "mask_rcnn_CBAM_HRNet_W18_FPN_shapes.yaml")


def _square_annotation(h, w, x0, y0, x1, y1):
    poly = [[x0, y0, x1, y0, x1, y1, x0, y1]]
    return {
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "bbox_mode": 1,
        "segmentation": poly,
        "category_id": 0,
    }


def _transform(tfm, image, ann):
    """detectron2's annotation path (what DatasetMapper does) for one RLE annotation."""
    h, w = image.shape[:2]
    (ann,) = augment.with_rle_masks({"height": h, "width": w, "annotations": [ann]})["annotations"]
    out = utils.transform_instance_annotations(
        ann, T.TransformList([tfm]), tfm.apply_image(image).shape[:2]
    )
    return out


def _same_images(a, b):
    """Per image of two batches: are the images equal?"""
    return [torch.equal(x["image"], y["image"]) for x, y in zip(a, b)]


class TestHardAugmentation(unittest.TestCase):
    def setUp(self):
        self.image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
        self.ann = _square_annotation(64, 96, 20, 10, 60, 50)

    def test_rle_masks_equal_the_polygons(self):
        d = {"height": 64, "width": 96, "annotations": [self.ann]}
        rle = augment.with_rle_masks(d)["annotations"][0]["segmentation"]
        poly = mask_util.decode(
            mask_util.merge(mask_util.frPyObjects(self.ann["segmentation"], 64, 96))
        )
        np.testing.assert_array_equal(mask_util.decode(rle), poly)
        self.assertIsInstance(d["annotations"][0]["segmentation"], list)  # the input is untouched

    def test_occlusion_paints_the_image_and_removes_those_pixels_from_the_masks(self):
        occluder = np.zeros((64, 96), bool)
        occluder[:, :40] = True  # hides the left half of the square
        fill = np.zeros_like(self.image)
        tfm = augment.OcclusionTransform(occluder, fill)
        image = tfm.apply_image(self.image)
        self.assertTrue((image[occluder] == 0).all())
        np.testing.assert_array_equal(image[~occluder], self.image[~occluder])
        mask = _transform(tfm, self.image, self.ann)["segmentation"]
        self.assertFalse(mask[:, :40].any())
        self.assertEqual(int(mask.sum()), 40 * 20)  # rows 10..49, columns 40..59
        with self.assertRaisesRegex(ValueError, "bitmask"):
            tfm.apply_polygons([np.zeros((4, 2))])

    def test_stretch_moves_boxes_with_the_masks(self):
        np.random.seed(3)
        tfm = augment.RandomStretch(1.35).get_transform(self.image)
        self.assertNotEqual(tfm.new_h / tfm.h, tfm.new_w / tfm.w)
        out = _transform(tfm, self.image, self.ann)
        ys, xs = np.nonzero(out["segmentation"])
        np.testing.assert_allclose(
            out["bbox"], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1.01
        )

    def test_photometric_corruptions_change_pixels_only(self):
        augs = augment.with_hard_augmentations([], 1.0)[2:]  # after the gate and the stretch
        self.assertEqual(len(augs), 6)
        for aug in augs[1:]:  # [0] is the occlusion
            with self.subTest(aug=type(aug.aug).__name__):
                np.random.seed(1)
                tfm = aug.get_transform(self.image)
                image = tfm.apply_image(self.image)
                self.assertEqual((image.shape, image.dtype), (self.image.shape, np.uint8))
                self.assertFalse(np.array_equal(image, self.image))
                out = _transform(tfm, self.image, self.ann)
                np.testing.assert_array_equal(out["bbox"], [20, 10, 60, 50])
                self.assertEqual(int(out["segmentation"].sum()), 40 * 40)

    def test_bad_probability_names_the_key(self):
        for prob in (-0.1, 1.5):
            with self.assertRaisesRegex(ValueError, r"INPUT.HARD_AUG.PROB must be in \[0, 1\]"):
                augment.with_hard_augmentations([], prob)

    def test_bad_start_iteration_names_the_key(self):
        with self.assertRaisesRegex(ValueError, r"INPUT.HARD_AUG.START_ITER must be >= 0"):
            augment.IterationGate(-1, 8, 1)

    def test_the_gate_opens_at_its_iteration_from_the_images_each_worker_maps(self):
        for workers, first, opens_at_image in ((1, 0, 8), (2, 0, 4), (1, 1, 4), (1, 3, 0)):
            gate = augment.IterationGate(2, images_per_batch=4, workers=workers)
            gate.first_iteration = first
            seen = []
            for _ in range(12):
                self.assertIsInstance(gate(T.AugInput(self.image)), T.NoOpTransform)
                seen.append(gate.open)
            self.assertEqual(seen.index(True), opens_at_image, (workers, first))
            self.assertTrue(all(seen[opens_at_image:]))

    def test_gated_corruptions_apply_nothing_before_the_gate_opens(self):
        gate = augment.IterationGate(1, images_per_batch=1, workers=1)
        augs = T.AugmentationList(augment.with_hard_augmentations([], 1.0, gate))
        before = T.AugInput(self.image.copy())
        augs(before)  # image 0, iteration 0: closed
        np.testing.assert_array_equal(before.image, self.image)
        after = T.AugInput(self.image.copy())
        augs(after)  # iteration 1: every corruption at PROB 1
        self.assertFalse(np.array_equal(after.image, self.image))

    def test_cut_instances_moves_only_the_box_sides_the_occluder_moved(self):
        masks = torch.zeros(3, 64, 96, dtype=torch.bool)
        masks[0, 10:50, 20:60] = True  # left half hidden below
        masks[1, 10:20, 70:90] = True  # untouched
        masks[2, 40:60, 0:10] = True  # hidden entirely
        inst = Instances((64, 96))
        # annotated boxes half a pixel off the masks' pixel extents, as polygons' rasters are
        inst.gt_boxes = Boxes(torch.tensor([[19.5, 9.5, 60.5, 50.5], [69.5, 9.5, 90.5, 20.5],
                                            [0.0, 39.5, 10.5, 60.5]]))  # fmt: skip
        inst.gt_masks = BitMasks(masks)
        inst.gt_classes = torch.tensor([1, 2, 3])
        occluder = np.zeros((64, 96), bool)
        occluder[:, :40] = True
        out = augment.cut_instances(inst, [occluder])
        self.assertEqual(out.gt_classes.tolist(), [1, 2])  # the hidden one is dropped
        self.assertEqual(
            out.gt_boxes.tensor.tolist(), [[40, 9.5, 60.5, 50.5], [69.5, 9.5, 90.5, 20.5]]
        )
        self.assertFalse(out.gt_masks.tensor[:, :, :40].any())
        self.assertEqual(int(out.gt_masks.tensor[0].sum()), 40 * 20)
        boxes_only = Instances((64, 96), gt_boxes=Boxes(torch.tensor([[1.0, 2, 3, 4]])))
        self.assertIs(augment.cut_instances(boxes_only, [occluder]), boxes_only)
        polygons = Instances((64, 96), gt_masks=PolygonMasks([[np.array([0, 0, 9, 0, 9, 9.0])]]))
        with self.assertRaisesRegex(ValueError, "bitmask"):
            augment.cut_instances(polygons, [occluder])

    def test_the_mapper_cuts_masks_and_moves_only_the_cut_box_sides(self):
        occluder = np.zeros((64, 96), bool)
        occluder[:, :40] = True
        mapper = RobustDatasetMapper(
            True,
            augmentations=[augment.OcclusionTransform(occluder, np.zeros_like(self.image))],
            image_format="BGR",
            use_instance_mask=True,
            instance_mask_format="bitmask",
        )
        hidden = _square_annotation(64, 96, 2, 2, 30, 30)  # entirely behind the occluder
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "a.png")
            cv2.imwrite(path, self.image)
            d = {"file_name": path, "height": 64, "width": 96, "image_id": 0}
            d["annotations"] = [self.ann, hidden]
            out = mapper(augment.with_rle_masks(d))
        self.assertFalse(out["image"][:, :, :40].any())  # painted
        inst = out["instances"]
        self.assertEqual(len(inst), 1)  # the hidden square is dropped
        self.assertFalse(inst.gt_masks.tensor[:, :, :40].any())
        # left side: the cut mask's extent; the others: the annotated box (20, 10, 60, 50)
        self.assertEqual(inst.gt_boxes.tensor.tolist(), [[40, 10, 60, 50]])

    def _loader(self, d, name, opts, ims):
        cfg = get_config(SHAPES, [
            "DATASETS.TRAIN", (name,), "DATALOADER.NUM_WORKERS", 0, "SOLVER.IMS_PER_BATCH", ims,
            "INPUT.RANDOM_FLIP", "none", "DATALOADER.ASPECT_RATIO_GROUPING", False,
            "OUTPUT_DIR", d, *opts,
        ])  # fmt: skip
        torch.manual_seed(0)
        np.random.seed(0)
        return ResumableLoader(build_train_loader(cfg))

    def _batches(self, d, name, opts, n=1, ims=6, begin_at=None):
        loader = self._loader(d, name, opts, ims)
        if begin_at is not None:
            loader.begin_at(begin_at)
        it = iter(loader)
        return [next(it) for _ in range(n)]

    def test_a_resume_tells_the_gates_where_the_stream_begins_unless_it_replays_it(self):
        class Loader:
            def __init__(self):
                self.calls = []

            def begin_at(self, i):
                self.calls.append(("begin_at", i))

            def fast_forward(self, n):
                self.calls.append(("fast_forward", n))

        state = np.random.get_state()
        for enabled, expected in ((False, ("begin_at", 5)), (True, ("fast_forward", 5))):
            loader = Loader()
            hook = ExactResume(loader, enabled=enabled, seed=1, checkpoint_period=10)
            hook.trainer = SimpleNamespace(start_iter=5)
            hook.load_state_dict({"iteration": 4, "ranks": [capture_rng_state()]})
            hook.before_train()
            self.assertEqual(loader.calls, [expected])
        np.random.set_state(state)

    def _first_batch(self, d, name, opts):
        return self._batches(d, name, opts)[0]

    def test_corruptions_start_at_their_iteration_and_after_a_resume_without_replay(self):
        with tempfile.TemporaryDirectory() as d:
            json_file = generate_shapes(d, "train", 4, seed=5)
            register_coco_json("hard_aug_start", json_file, os.path.join(d, "train"))
            plain = self._batches(d, "hard_aug_start", [], n=2, ims=2)
            late = [
                "INPUT.HARD_AUG.ENABLED", True, "INPUT.MASK_FORMAT", "bitmask",
                "INPUT.HARD_AUG.PROB", 1.0, "INPUT.HARD_AUG.START_ITER", 1,
            ]  # fmt: skip
            fresh = self._batches(d, "hard_aug_start", late, n=2, ims=2)
            resumed = self._batches(d, "hard_aug_start", late, n=1, ims=2, begin_at=1)
            # the same in a data-loader worker process, which maps with its copy of the gate
            # (against a gate that stays closed: a worker draws from its own random stream)
            worker = [*late, "DATALOADER.NUM_WORKERS", 1]
            closed = self._batches(d, "hard_aug_start", [*worker, "INPUT.HARD_AUG.START_ITER", 9],
                                   n=2, ims=2)  # fmt: skip
            in_worker = self._batches(d, "hard_aug_start", worker, n=2, ims=2)
            resumed_in_worker = self._batches(d, "hard_aug_start", worker, ims=2, begin_at=1)

        self.assertEqual(_same_images(fresh[0], plain[0]), [True, True])  # iteration 0: clean
        self.assertEqual(_same_images(fresh[1], plain[1]), [False, False])  # iteration 1: corrupted
        # the stream began at 1
        self.assertEqual(_same_images(resumed[0], plain[0]), [False, False])
        self.assertEqual(_same_images(in_worker[0], closed[0]), [True, True])
        self.assertEqual(_same_images(in_worker[1], closed[1]), [False, False])
        self.assertEqual(_same_images(resumed_in_worker[0], closed[0]), [False, False])

    def test_precise_bn_sees_the_images_training_sees_at_its_iteration(self):
        class Recorder(torch.nn.Module):  # a model with BN that keeps the batches it is given
            def __init__(self):
                super().__init__()
                self.bn = torch.nn.BatchNorm1d(3)
                self.batches = []

            def forward(self, batch):
                self.batches.append(batch)
                self.bn(torch.stack([x["image"].float().mean((1, 2)) for x in batch]))

        late = [
            "INPUT.HARD_AUG.ENABLED", True, "INPUT.MASK_FORMAT", "bitmask",
            "INPUT.HARD_AUG.PROB", 1.0, "INPUT.HARD_AUG.START_ITER", 3,
        ]  # fmt: skip
        with tempfile.TemporaryDirectory() as d:
            json_file = generate_shapes(d, "train", 4, seed=5)
            register_coco_json("hard_aug_bn", json_file, os.path.join(d, "train"))
            plain = self._batches(d, "hard_aug_bn", [], n=2, ims=2)
            seen = {}
            for hook_class in (PreciseBN, hooks.PreciseBN):  # this project's, detectron2's
                model = Recorder()
                hook = hook_class(0, model, self._loader(d, "hard_aug_bn", late, ims=2), 1)
                for iteration in (0, 5):  # before START_ITER, after it
                    hook.trainer = SimpleNamespace(iter=iteration)
                    hook.update_stats()
                seen[hook_class] = [_same_images(a, b) for a, b in zip(model.batches, plain)]
        self.assertEqual(seen[PreciseBN], [[True, True], [False, False]])
        # detectron2's counts the iterations of its own stream from 0: still clean at 5
        self.assertEqual(seen[hooks.PreciseBN], [[True, True], [True, True]])

    def test_the_loader_keeps_the_annotated_boxes_unless_occlusion_cuts_them(self):
        with tempfile.TemporaryDirectory() as d:
            json_file = generate_shapes(d, "train", 6, seed=5)
            register_coco_json("hard_aug_test", json_file, os.path.join(d, "train"))
            plain = self._first_batch(d, "hard_aug_test", [])
            on = ["INPUT.HARD_AUG.ENABLED", True, "INPUT.MASK_FORMAT", "bitmask"]
            never = self._first_batch(d, "hard_aug_test", [*on, "INPUT.HARD_AUG.PROB", 0.0])
            always = self._first_batch(d, "hard_aug_test", [*on, "INPUT.HARD_AUG.PROB", 1.0])
        # at PROB 0 the RLE / bitmask path trains on the same boxes as detectron2's polygon path
        # (recomputing them from the rasterised masks shrank them by ~1.2 px: 10 box AP)
        self.assertEqual([x["file_name"] for x in never], [x["file_name"] for x in plain])
        for a, b in zip(plain, never):
            self.assertTrue(
                torch.equal(a["instances"].gt_boxes.tensor, b["instances"].gt_boxes.tensor)
            )
            self.assertTrue(torch.equal(a["instances"].gt_classes, b["instances"].gt_classes))
        # occlusion may hide every object of an image (an image without instances trains as
        # background); a kept instance has pixels, and its box bounds them within a pixel
        self.assertGreater(sum(len(x["instances"]) for x in always), 0)
        for x in always:
            inst = x["instances"]
            if not len(inst):
                continue
            self.assertTrue(inst.gt_masks.tensor.flatten(1).any(1).all())
            extent = inst.gt_masks.get_bounding_boxes().tensor
            boxes = inst.gt_boxes.tensor
            self.assertTrue((boxes[:, :2] <= extent[:, :2] + 1).all())
            self.assertTrue((boxes[:, 2:] >= extent[:, 2:] - 1).all())


class TestCorruptDataset(unittest.TestCase):
    def test_boxes_keep_the_annotated_sides_the_occluders_did_not_move(self):
        corrected_box = load_tool("corrupt_dataset").corrected_box
        before = np.zeros((40, 60), bool)
        before[10:29, 10:29] = True  # the raster of a polygon ends short of its box (10..30)
        after = before.copy()
        after[:, :15] = False  # an occluder hides the left part
        self.assertEqual(corrected_box([10, 10, 20, 20], (1, 1), before, before), [10, 10, 20, 20])
        self.assertEqual(corrected_box([10, 10, 20, 20], (1, 1), before, after), [15, 10, 15, 20])
        self.assertEqual(
            corrected_box([10, 10, 20, 20], (1.5, 1), before, before), [15, 10, 30, 20]
        )

    def test_writes_a_valid_coco_set_whose_boxes_bound_the_masks(self):
        corrupt = load_tool("corrupt_dataset")
        with tempfile.TemporaryDirectory() as d:
            json_file = generate_shapes(d, "val", 6, seed=7)
            out = os.path.join(d, "hard")
            self.assertEqual(
                corrupt.main(
                    ["--json", json_file, "--images", os.path.join(d, "val"), "--out", out]
                ),
                0,
            )
            hard_json, images = os.path.join(out, "val.json"), os.path.join(out, "images")
            validate_coco_json(hard_json, images)  # raises on any inconsistency
            with open(hard_json) as f:
                coco = json.load(f)
            self.assertEqual(len(coco["images"]), 6)
            sizes = {i["id"]: (i["height"], i["width"]) for i in coco["images"]}
            for a in coco["annotations"]:
                mask = mask_util.decode(a["segmentation"])
                self.assertEqual(mask.shape, sizes[a["image_id"]])
                ys, xs = np.nonzero(mask)
                x, y, w, h = a["bbox"]
                # the annotated box (scaled), or the mask's extent on the sides a cut moved: a
                # box bounds its mask within the ~1.3 px a polygon's raster falls short of it,
                # times the stretch (up to 1.5), plus a pixel of nearest-neighbour resizing
                np.testing.assert_allclose(
                    [x, y, x + w, y + h], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=3.5
                )
                self.assertGreaterEqual(mask.sum(), 16)
            # a user's dataset named shapes_* is checked, not taken for a generator split
            name = "shapes_val_hard_test"
            cfg = get_config(CONFIG, [
                "DATASETS.REGISTER_COCO", [[name, hard_json, images]],
                "DATASETS.TEST", (name,), "DATASETS.TRAIN", (name,),
            ])  # fmt: skip
            register_from_cfg(cfg)
            check_datasets(cfg)
