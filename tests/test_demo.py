"""demo/demo.py as a user runs it: many image kinds, bad files, attention pictures, video."""

import os
import subprocess
import sys
import tempfile
import unittest

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

from .common import REPO, get_config

CONFIG = os.path.join(
    REPO, "configs/quick_schedules/mask_rcnn_CBAM_HRNet_W18_FPN_instant_test.yaml"
)


def _weights(path, opts=()):
    """A random model whose detections keep the proposals' boxes, so the demo has things to draw."""
    torch.manual_seed(0)
    model = build_model(get_config(CONFIG, opts))
    torch.nn.init.zeros_(model.roi_heads.box_predictor.bbox_pred.weight)
    torch.nn.init.zeros_(model.roi_heads.box_predictor.bbox_pred.bias)
    torch.save({"model": model.state_dict()}, path)


def run_demo(args):
    cmd = [sys.executable, os.path.join(REPO, "demo", "demo.py"), "--config-file", CONFIG] + args
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
class TestDemo(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        d = cls.tmp.name
        cls.weights = os.path.join(d, "w.pth")
        _weights(cls.weights)
        cls.inputs = os.path.join(d, "in")
        os.makedirs(cls.inputs)
        rng = np.random.default_rng(0)
        rgb = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
        cv2.rectangle(rgb, (30, 30), (90, 100), (255, 255, 0), -1)
        Image.fromarray(rgb).save(cls.p("rgb.png"))
        Image.fromarray(rgb).convert("L").save(cls.p("gray.png"))
        Image.fromarray(rgb).convert("RGBA").save(cls.p("rgba.png"))
        Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(cls.p("palette.png"))
        cv2.imwrite(cls.p("deep16.png"), (rgb.astype(np.uint16) * 257)[:, :, ::-1])
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees on display: 160x120 stored, 120x160 shown
        Image.fromarray(rgb).save(cls.p("rotated.jpg"), exif=exif)
        with open(cls.p("corrupt.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 255, 200, dtype=np.uint8)))
        with open(cls.p("notes.jpg"), "w") as f:
            f.write("this is text, not a picture\n")
        cls.good = {
            "rgb.png": (160, 120),
            "gray.png": (160, 120),
            "rgba.png": (160, 120),
            "palette.png": (160, 120),
            "deep16.png": (160, 120),
            "rotated.jpg": (120, 160),
        }
        cls.out = os.path.join(d, "out")
        cls.proc = run_demo(
            [
                "--input",
                cls.inputs,
                "--output",
                cls.out,
                "--confidence-threshold",
                "0.0",
                "--attention",
                "--opts",
                "MODEL.WEIGHTS",
                cls.weights,
            ]
        )

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    @classmethod
    def p(cls, name):
        return os.path.join(cls.inputs, name)

    def test_bad_inputs_are_named_and_exit_status_is_nonzero(self):
        self.assertEqual(self.proc.returncode, 1, self.proc.stderr[-2000:])
        self.assertRegex(self.proc.stderr, r"corrupt.png: not a readable image")
        self.assertRegex(self.proc.stderr, r"notes.jpg: not a readable image")

    def test_good_inputs_give_pictures_of_input_size_with_drawings(self):
        for name, (w, h) in self.good.items():
            with self.subTest(name=name):
                out = os.path.join(self.out, name)  # same name as the input, like detectron2
                pic = cv2.imread(out)
                self.assertIsNotNone(pic, out)
                self.assertEqual(pic.shape[:2], (h, w))
                src = cv2.imread(self.p("rgb.png"))
                if name == "rgb.png":
                    self.assertGreater(np.abs(pic.astype(int) - src).mean(), 1.0)
        leftovers = [f for f in os.listdir(self.out) if ".tmp" in f]
        self.assertEqual(leftovers, [])

    def test_attention_writes_one_heatmap_per_cbam_site_and_the_channel_plot(self):
        files = os.listdir(self.out)
        maps = sorted(f for f in files if f.startswith("rgb_attention_"))
        self.assertEqual(maps, [f"rgb_attention_hr{i}.png" for i in range(2, 6)])
        self.assertIn("rgb_channel_attention.png", files)
        heat = cv2.imread(os.path.join(self.out, maps[0]))
        self.assertEqual(heat.shape[:2], (120, 160))

    def test_attention_with_cbam_after_fpn_gives_five_sites(self):
        w = os.path.join(self.tmp.name, "fpn.pth")
        _weights(w, ["MODEL.CBAM.POSITION", "fpn"])
        out = os.path.join(self.tmp.name, "out_fpn")
        proc = run_demo(
            [
                "--input",
                self.p("rgb.png"),
                "--output",
                out + os.sep,
                "--attention",
                "--opts",
                "MODEL.WEIGHTS",
                w,
                "MODEL.CBAM.POSITION",
                "fpn",
            ]
        )
        self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
        maps = sorted(f for f in os.listdir(out) if "_attention_p" in f)
        self.assertEqual(maps, [f"rgb_attention_p{i}.png" for i in range(2, 7)])

    def test_video_keeps_frame_count_size_and_rate(self):
        src = os.path.join(self.tmp.name, "clip.mp4")
        writer = cv2.VideoWriter(src, cv2.VideoWriter_fourcc(*"mp4v"), 12.0, (96, 64))
        for i in range(5):
            writer.write(np.full((64, 96, 3), 40 * i, np.uint8))
        writer.release()
        out = os.path.join(self.tmp.name, "clip_out.mp4")
        proc = run_demo(
            ["--video-input", src, "--output", out, "--opts", "MODEL.WEIGHTS", self.weights]
        )
        self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
        cap = cv2.VideoCapture(out)
        frames = 0
        while cap.read()[0]:
            frames += 1
        self.assertEqual(frames, 5)
        self.assertEqual(
            (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))),
            (96, 64),
        )
        self.assertAlmostEqual(cap.get(cv2.CAP_PROP_FPS), 12.0, places=1)

    def test_output_directory_that_cannot_be_created_fails_before_inference(self):
        blocker = os.path.join(self.tmp.name, "a_file")
        open(blocker, "w").close()
        proc = run_demo(["--input", self.inputs, "--output", os.path.join(blocker, "sub")])
        self.assertEqual(proc.returncode, 2)
        self.assertIn("cannot create output directory", proc.stderr)
        self.assertNotIn("detected", proc.stderr + proc.stdout)
