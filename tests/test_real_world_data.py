"""COCO files as labelling tools export them, and bad files met during a run: no "info",
RLE masks (compressed and uncompressed), crowd regions, category ids with gaps, images without
annotations, file names with sub-folders; truncated / zero-byte images; a json that is not JSON
through the library path; the dataset check."""

import json
import os
import shutil
import subprocess
import sys
import unittest

import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from pycocotools import mask as mask_util

from cbam_hrnet_d2.data import generate_shapes, register_coco_json

from .common import REPO
from .test_training import TrainingTestCase, read_metrics, run_train_net


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (counts as a list, column-major, starting with a run of zeros)."""
    flat = mask.ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def make_tool_export(src_json: str, src_images: str, out_dir: str) -> str:
    """Rewrite a generated shapes split as a mask-based labelling tool might export it. Returns the
    new json path; images are copied to ``out_dir/images/<sub>/``."""
    with open(src_json) as f:
        data = json.load(f)
    data.pop("info", None)
    data.pop("licenses", None)
    for i, img in enumerate(data["images"]):
        sub = f"batch{i % 2}"
        os.makedirs(os.path.join(out_dir, "images", sub), exist_ok=True)
        shutil.copy(
            os.path.join(src_images, img["file_name"]), os.path.join(out_dir, "images", sub)
        )
        img["file_name"] = f"{sub}/{img['file_name']}"
    images = {img["id"]: img for img in data["images"]}
    for ann in data["annotations"]:
        img = images[ann["image_id"]]
        rles = mask_util.frPyObjects(ann["segmentation"], img["height"], img["width"])
        mask = mask_util.decode(mask_util.merge(rles))
        if ann["id"] % 2:
            ann["segmentation"] = _uncompressed_rle(mask)
        else:
            rle = mask_util.encode(np.asfortranarray(mask))
            ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        ann["category_id"] *= 10  # ids 10, 20, ..., 60 (gaps, like COCO's 1..90)
    for cat in data["categories"]:
        cat["id"] *= 10
    # a crowd region (uncompressed RLE, as COCO's own) on the first image
    first = data["images"][0]
    crowd = np.zeros((first["height"], first["width"]), np.uint8)
    crowd[:10, :10] = 1
    data["annotations"].append(
        {
            "id": 10_000,
            "image_id": first["id"],
            "category_id": 10,
            "iscrowd": 1,
            "area": 100.0,
            "bbox": [0.0, 0.0, 10.0, 10.0],
            "segmentation": _uncompressed_rle(crowd),
        }
    )
    # an image without annotations
    last = data["images"][-1]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != last["id"]]
    out_json = os.path.join(out_dir, "export.json")
    with open(out_json, "w") as f:
        json.dump(data, f)
    return out_json


def truncate(path: str, keep: float = 0.5) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


@pytest.mark.slow
class TestToolExports(TrainingTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        root = os.path.join(cls.tmp.name, "data")
        cls.train_json = make_tool_export(
            f"{root}/train.json", f"{root}/train", os.path.join(cls.tmp.name, "xtrain")
        )
        cls.val_json = make_tool_export(
            f"{root}/val.json", f"{root}/val", os.path.join(cls.tmp.name, "xval")
        )
        cls.export_opts = [
            "DATASETS.REGISTER_COCO",
            f"[['x_train', '{cls.train_json}', '{cls.tmp.name}/xtrain/images'], "
            f"['x_val', '{cls.val_json}', '{cls.tmp.name}/xval/images']]",
            "DATASETS.TRAIN",
            "('x_train',)",
            "DATASETS.TEST",
            "('x_val',)",
        ]

    def test_export_has_what_the_test_claims(self):
        with open(self.train_json) as f:
            data = json.load(f)
        self.assertNotIn("info", data)
        segs = [a["segmentation"] for a in data["annotations"]]
        self.assertTrue(all(isinstance(s, dict) for s in segs))
        self.assertTrue(any(isinstance(s["counts"], str) for s in segs))
        self.assertTrue(any(isinstance(s["counts"], list) for s in segs))
        self.assertTrue(any(a["iscrowd"] for a in data["annotations"]))
        self.assertEqual(sorted(c["id"] for c in data["categories"]), [10, 20, 30, 40, 50, 60])
        annotated = {a["image_id"] for a in data["annotations"]}
        self.assertTrue(any(img["id"] not in annotated for img in data["images"]))
        self.assertTrue(all("/" in img["file_name"] for img in data["images"]))

    def test_rle_export_without_info_trains_with_bitmasks_and_evaluates(self):
        out = self.out("export_train")
        proc = run_train_net(self.export_opts + ["OUTPUT_DIR", out])
        self.check(proc)
        log = proc.stdout + proc.stderr
        self.assertRegex(
            log, r"x_train: \d+ instance masks are RLE.*using INPUT.MASK_FORMAT 'bitmask'"
        )
        with open(os.path.join(out, "results.json")) as f:
            results = json.load(f)["x_val"]
        self.assertEqual(set(results), {"bbox", "segm"})

        # --eval-only on the json without "info" (pycocotools 2.0.9/2.0.10 crashed in loadRes)
        ev = self.out("export_eval")
        proc = run_train_net(
            ["--eval-only"]
            + self.export_opts
            + ["MODEL.WEIGHTS", os.path.join(out, "model_final.pth"), "OUTPUT_DIR", ev]
        )
        self.check(proc)
        self.assertIn("Evaluation results for segm", proc.stdout + proc.stderr)

    def test_dataset_check_passes_a_valid_export(self):
        proc = run_check(["x_train", "--config-file", CONFIG_FOR_CHECK] + self.export_opts[:2])
        self.assertEqual(proc.returncode, 0, proc.stdout[-2000:] + proc.stderr[-2000:])
        self.assertIn("x_train: ok", proc.stdout + proc.stderr)


CONFIG_FOR_CHECK = os.path.join(
    REPO, "configs/quick_schedules/mask_rcnn_CBAM_HRNet_W18_FPN_instant_test.yaml"
)


def run_check(args):
    cmd = [sys.executable, "-m", "cbam_hrnet_d2.data", "--check"] + [str(a) for a in args]
    return subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )


@pytest.mark.slow
class TestBadImages(TrainingTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        root = os.path.join(cls.tmp.name, "bad")
        cls.bad_train_json = generate_shapes(root, "train", 8, seed=11)
        cls.truncated = os.path.join(root, "train", "000003.png")
        cls.empty = os.path.join(root, "train", "000005.png")
        truncate(cls.truncated)
        open(cls.empty, "wb").close()
        cls.bad_opts = [
            "DATASETS.REGISTER_COCO",
            f"[['bad_train', '{cls.bad_train_json}', '{root}/train'], ['bad_val', "
            f"'{cls.bad_train_json}', '{root}/train']]",
            "DATASETS.TRAIN",
            "('bad_train',)",
        ]

    def test_bad_images_are_skipped_named_and_counted_in_metrics(self):
        out = self.out("bad_train")
        proc = run_train_net(self.bad_opts + ["DATASETS.TEST", "()", "OUTPUT_DIR", out])
        self.check(proc)
        log = proc.stdout + proc.stderr
        self.assertIn(
            f"Dataset 'bad_train': skipping image {self.truncated} (OSError: image file is "
            "truncated",
            log,
        )
        self.assertIn(
            f"Dataset 'bad_train': skipping image {self.empty} (UnidentifiedImageError", log
        )
        counts = [m["data/bad_images"] for m in read_metrics(out) if "data/bad_images" in m]
        self.assertEqual(counts[-1], 2)
        with open(os.path.join(out, "bad_images.tsv")) as f:
            listed = {line.split("\t")[1] for line in f}
        self.assertEqual(listed, {self.truncated, self.empty})
        self.assertRegex(
            log, r"2 image\(s\) were skipped as unusable; they are listed in .*bad_images.tsv"
        )

    def test_bad_image_in_evaluation_stops_naming_dataset_and_file(self):
        out = self.out("bad_eval")
        proc = run_train_net(
            ["--eval-only"] + self.bad_opts + ["DATASETS.TEST", "('bad_val',)", "OUTPUT_DIR", out]
        )
        self.assertNotEqual(proc.returncode, 0)
        self.assertRegex(
            proc.stderr,
            r"BadImageError: Dataset 'bad_val': image .*/train/00000[35].png cannot be used",
        )
        self.assertIn("--check bad_val", proc.stderr)

    def test_dataset_check_lists_every_bad_image_and_annotation(self):
        with open(self.bad_train_json) as f:
            data = json.load(f)
        data["annotations"][0]["bbox"] = [5.0, 5.0, 0.0, 3.0]
        bad_box_json = os.path.join(os.path.dirname(self.bad_train_json), "bad_box.json")
        with open(bad_box_json, "w") as f:
            json.dump(data, f)
        opts = [
            "DATASETS.REGISTER_COCO",
            f"[['bad_box', '{bad_box_json}', '{os.path.dirname(self.truncated)}']]",
        ]
        proc = run_check(["bad_box", "--config-file", CONFIG_FOR_CHECK] + opts)
        self.assertEqual(proc.returncode, 1)
        log = proc.stdout + proc.stderr
        self.assertIn(f"{self.truncated}: does not decode (OSError: image file is truncated", log)
        self.assertIn(f"{self.empty}: does not decode (UnidentifiedImageError", log)
        self.assertIn(f"annotation id {data['annotations'][0]['id']} of ", log)
        self.assertIn("has no area", log)
        self.assertIn("bad_box: 3 problem(s)", log)
        self.assertIn("checking bad_box", log)  # the progress bar


class TestCheckCommand(unittest.TestCase):
    def test_unregistered_name_is_named_with_how_to_register_it(self):
        from cbam_hrnet_d2.data.datasets import main

        with self.assertLogs("cbam_hrnet_d2.data.datasets", "ERROR") as logs:
            self.assertEqual(main(["--check", "no_such_dataset"]), 1)
        self.assertIn("Dataset 'no_such_dataset' is not registered", logs.output[0])
        self.assertIn("--config-file", logs.output[0])


class TestLibraryPath(unittest.TestCase):
    def test_register_then_get_on_a_file_that_is_not_json_names_the_file(self):
        tmp = self.enterContext(__import__("tempfile").TemporaryDirectory())
        bad = os.path.join(tmp, "bad.json")
        with open(bad, "w") as f:
            f.write("{not json")
        register_coco_json("library_path_bad_json", bad, tmp)
        with self.assertRaisesRegex(ValueError, rf"{bad} is not valid JSON"):
            DatasetCatalog.get("library_path_bad_json")

    def test_register_then_get_on_an_unknown_category_names_file_and_annotation(self):
        tmp = self.enterContext(__import__("tempfile").TemporaryDirectory())
        json_file = generate_shapes(tmp, "val", 2, seed=5)
        with open(json_file) as f:
            data = json.load(f)
        data["annotations"][0]["category_id"] = 99
        with open(json_file, "w") as f:
            json.dump(data, f)
        register_coco_json("library_path_bad_category", json_file, os.path.join(tmp, "val"))
        with self.assertRaisesRegex(
            ValueError, rf"{json_file}: annotation id \d+ has category_id 99"
        ):
            DatasetCatalog.get("library_path_bad_category")
