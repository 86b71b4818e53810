import filecmp
import json
import os
import tempfile
import unittest

import numpy as np
from pycocotools.coco import COCO

from cbam_hrnet_d2.data import SHAPES_CATEGORIES, generate_shapes


class TestShapesGenerator(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.a = os.path.join(cls.tmp.name, "a")
        cls.b = os.path.join(cls.tmp.name, "b")
        cls.json_a = generate_shapes(cls.a, "val", 12, seed=7)
        generate_shapes(cls.b, "val", 12, seed=7)
        cls.coco = COCO(cls.json_a)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_same_seed_gives_identical_files(self):
        cmp = filecmp.dircmp(os.path.join(self.a, "val"), os.path.join(self.b, "val"))
        self.assertEqual(len(cmp.common_files), 12)
        _, mismatch, errors = filecmp.cmpfiles(
            os.path.join(self.a, "val"),
            os.path.join(self.b, "val"),
            cmp.common_files,
            shallow=False,
        )
        self.assertEqual((mismatch, errors), ([], []))
        self.assertTrue(filecmp.cmp(self.json_a, os.path.join(self.b, "val.json"), shallow=False))

    def test_other_seed_gives_other_images(self):
        c = os.path.join(self.tmp.name, "c")
        generate_shapes(c, "val", 2, seed=8)
        self.assertFalse(
            filecmp.cmp(
                os.path.join(self.a, "val", "000000.png"),
                os.path.join(c, "val", "000000.png"),
                shallow=False,
            )
        )

    def test_categories_are_the_six_shapes_with_ids_1_to_6(self):
        cats = self.coco.loadCats(self.coco.getCatIds())
        self.assertEqual(
            [(c["id"], c["name"]) for c in cats], list(enumerate(SHAPES_CATEGORIES, 1))
        )

    def test_masks_lie_inside_images_and_match_boxes(self):
        self.assertGreater(len(self.coco.getAnnIds()), 12)
        for ann in self.coco.loadAnns(self.coco.getAnnIds()):
            img = self.coco.loadImgs(ann["image_id"])[0]
            for poly in ann["segmentation"]:
                xy = np.array(poly).reshape(-1, 2)
                self.assertTrue((xy >= 0).all() and (xy[:, 0] <= img["width"]).all())
                self.assertTrue((xy[:, 1] <= img["height"]).all())
            mask = self.coco.annToMask(ann)
            self.assertEqual(mask.shape, (img["height"], img["width"]))
            self.assertGreater(mask.sum(), 0)
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            self.assertLessEqual(abs(xs.min() - x), 2)
            self.assertLessEqual(abs(ys.min() - y), 2)
            self.assertLessEqual(abs(xs.max() + 1 - (x + w)), 2)
            self.assertLessEqual(abs(ys.max() + 1 - (y + h)), 2)

    def test_images_hold_several_categories(self):
        cats = {a["category_id"] for a in self.coco.loadAnns(self.coco.getAnnIds())}
        self.assertGreaterEqual(len(cats), 4)
        per_image = [len(self.coco.getAnnIds(imgIds=[i])) for i in self.coco.getImgIds()]
        self.assertGreater(max(per_image), 1)

    def test_json_images_exist(self):
        with open(self.json_a) as f:
            data = json.load(f)
        for img in data["images"]:
            self.assertTrue(os.path.isfile(os.path.join(self.a, "val", img["file_name"])))


class TestDatasetFaults(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.json = generate_shapes(self.tmp.name, "val", 3, seed=3)
        self.root = os.path.join(self.tmp.name, "val")
        with open(self.json) as f:
            self.data = json.load(f)

    def tearDown(self):
        self.tmp.cleanup()

    def write(self, data):
        with open(self.json, "w") as f:
            json.dump(data, f)

    def test_valid_file_passes(self):
        from cbam_hrnet_d2.data import validate_coco_json

        validate_coco_json(self.json, self.root)

    def test_not_json_names_the_file(self):
        from cbam_hrnet_d2.data import validate_coco_json

        with open(self.json, "w") as f:
            f.write("{not json")
        with self.assertRaisesRegex(ValueError, r"val.json is not valid JSON"):
            validate_coco_json(self.json, self.root)

    def test_unknown_category_names_file_and_annotation(self):
        from cbam_hrnet_d2.data import validate_coco_json

        self.data["annotations"][1]["category_id"] = 42
        self.write(self.data)
        ann_id = self.data["annotations"][1]["id"]
        with self.assertRaisesRegex(
            ValueError, rf"val.json: annotation id {ann_id} has category_id 42"
        ):
            validate_coco_json(self.json, self.root)

    def test_missing_image_names_file_and_image(self):
        from cbam_hrnet_d2.data import validate_coco_json

        os.remove(os.path.join(self.root, "000001.png"))
        with self.assertRaisesRegex(FileNotFoundError, r"val.json: image id 2 names .*000001.png"):
            validate_coco_json(self.json, self.root)

    def test_rle_of_the_wrong_size_names_file_annotation_and_both_sizes(self):
        from cbam_hrnet_d2.data import validate_coco_json

        img = self.data["images"][0]
        ann = next(a for a in self.data["annotations"] if a["image_id"] == img["id"])
        h, w = img["height"], img["width"]
        ann["segmentation"] = {"size": [h + 1, w], "counts": "abc"}
        self.write(self.data)
        with self.assertRaisesRegex(
            ValueError,
            rf"val.json: annotation id {ann['id']}: RLE size \[{h + 1}, {w}\] "
            rf"differs from its image's \[height, width\] \[{h}, {w}\]",
        ):
            validate_coco_json(self.json, self.root)

    def test_image_without_height_and_width_names_file_and_image(self):
        from cbam_hrnet_d2.data import validate_coco_json

        del self.data["images"][1]["height"]
        self.write(self.data)
        with self.assertRaisesRegex(
            ValueError, r"val.json: image id 2 has no numeric 'height' and 'width'"
        ):
            validate_coco_json(self.json, self.root)

    def test_degenerate_polygons_are_dropped_with_one_counted_warning(self):
        from cbam_hrnet_d2.data import load_coco_instances

        self.data["annotations"][0]["segmentation"] = [[1.0, 2.0, 3.0, 4.0]]
        self.data["annotations"][1]["segmentation"] = []
        self.write(self.data)
        with self.assertLogs(level="WARNING") as logs:
            dicts = load_coco_instances(self.json, self.root, "faulty")
        text = "\n".join(logs.output)
        self.assertRegex(text, r"Filtered out 1 instances without valid segmentation")
        self.assertRegex(text, r"dropped 1 instances with an empty segmentation")
        self.assertTrue(all("segmentation" in a for d in dicts for a in d["annotations"]))
        kept = sum(len(d["annotations"]) for d in dicts)
        self.assertEqual(kept, len(self.data["annotations"]) - 2)

    def test_image_size_differing_from_its_annotation_names_the_file(self):
        from detectron2.data import DatasetMapper
        from detectron2.data.detection_utils import SizeMismatchError

        from cbam_hrnet_d2.data import load_coco_instances

        from .common import get_config

        self.data["images"][0]["width"] += 7
        self.write(self.data)
        dicts = load_coco_instances(self.json, self.root, "resized")
        mapper = DatasetMapper(get_config(), is_train=True)
        mapper(dicts[1])  # an untouched entry maps fine
        with self.assertRaisesRegex(SizeMismatchError, r"for image .*000000.png"):
            mapper(dicts[0])
