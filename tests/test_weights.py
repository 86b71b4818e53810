"""ImageNet HRNet weights: conversion, MODEL.WEIGHTS / MODEL.CBAM_HRNET.PRETRAINED loading, bad
files."""

import os
import pickle
import tempfile
import unittest

import timm
import torch
from detectron2.modeling import build_model
from safetensors.torch import save_file

from cbam_hrnet_d2.checkpoint.checkpointer import SafeCheckpointer, load_tensor_file
from cbam_hrnet_d2.modeling.hrnet import HRNET_FEATURES
from cbam_hrnet_d2.modeling.hrnet_weights import convert_hrnet_weights as convert

from .common import CONFIGS, get_config, load_tool

# the CPU speed-ups off: channels-last kernels round differently, and the outputs of these random
# networks grow to 1e3, where that rounding exceeds the tolerances below
LAYER_OFF = [
    x
    for key in ("CHANNELS_LAST", "SPARSE_ROI_ALIGN", "BF16_HEADS")
    for x in (f"MODEL.CBAM_HRNET.CPU.{key}", False)
]


def timm_classifier(width):
    torch.manual_seed(width)
    return timm.create_model(f"hrnet_w{width}", pretrained=False).eval()


def timm_features(model, x):
    feats = timm.create_model(
        model.default_cfg["architecture"],
        features_only=True,
        feature_location="",
        out_indices=(1, 2, 3, 4),
    ).eval()
    feats.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        return feats(x)


def trunk_outputs(model, x):
    with torch.no_grad():
        out = model.backbone.bottom_up.trunk(x)
    return dict(zip(HRNET_FEATURES, out))


class _Payload:
    """Unpickling this creates a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class TestHRNetWeights(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.w18 = timm_classifier(18)
        cls.x = torch.rand(1, 3, 64, 96)
        cls.expected = timm_features(cls.w18, cls.x)
        sd = cls.w18.state_dict()
        cls.timm_pth = cls.path("hrnet_w18.pth")
        torch.save(sd, cls.timm_pth)
        cls.timm_st = cls.path("hrnet_w18.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, cls.timm_st)
        # official HRNet-Image-Classification layout: a DataParallel-style "module." prefix
        cls.official = cls.path("hrnetv2_w18_imagenet_pretrained.pth")
        torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, cls.official)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    @classmethod
    def path(cls, name):
        return os.path.join(cls.tmp.name, name)

    def cfg(self, opts=()):
        # outputs compared bit for bit (LAYER_OFF); no MODEL.WEIGHTS, which would win over
        # MODEL.CBAM_HRNET.PRETRAINED
        return get_config(
            opts=["MODEL.CBAM_HRNET.NORM", "BN", "MODEL.WEIGHTS", "", *LAYER_OFF, *opts]
        )

    def assert_trunk_equals_timm(self, model):
        model.eval()
        for got, want in zip(trunk_outputs(model, self.x).values(), self.expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)

    def test_the_command_line_tool_writes_a_file_model_weights_loads(self):
        out = self.path("tool_d2.safetensors")
        with self.assertLogs("cbam_hrnet_d2.convert_hrnet_weights", "INFO") as logs:
            load_tool("convert_hrnet_weights").main(["--src", self.timm_st, "--out", out])
        self.assertIn("trunk tensors not in the source: none", logs.output[-1])
        model = build_model(self.cfg())
        SafeCheckpointer(model).load(out)
        self.assert_trunk_equals_timm(model)

    def test_caffe2_style_pkl_blobs_load_without_their_momentum_entries(self):
        sd = {"backbone.bottom_up.trunk." + k: v.numpy() for k, v in self.w18.state_dict().items()}
        sd["backbone.bottom_up.trunk.conv1.weight_momentum"] = sd[
            "backbone.bottom_up.trunk.conv1.weight"
        ]
        c2 = self.path("c2.pkl")
        with open(c2, "wb") as f:
            pickle.dump({"blobs": sd}, f)
        loaded = SafeCheckpointer(build_model(self.cfg()))._load_file(c2)
        self.assertEqual(loaded["__author__"], "Caffe2")
        self.assertTrue(loaded["matching_heuristics"])
        self.assertFalse(any(k.endswith("_momentum") for k in loaded["model"]))
        self.assertEqual(len(loaded["model"]), len(sd) - 1)

    def test_converted_files_load_through_model_weights_and_match_timm_exactly(self):
        for src in (self.timm_pth, self.timm_st, self.official):
            for ext in (".safetensors", ".pth"):
                with self.subTest(src=os.path.basename(src), out=ext):
                    out = self.path(os.path.basename(src) + "_d2" + ext)
                    report = convert(src, out, 18)
                    self.assertEqual(report["missing"], [])
                    self.assertTrue(any(k.startswith("classifier") for k in report["unused"]))
                    model = build_model(self.cfg())
                    SafeCheckpointer(model).load(out)
                    self.assert_trunk_equals_timm(model)

    def test_default_recipe_loads_converted_weights_into_its_frozen_norms(self):
        out = self.path("default_recipe_d2.safetensors")
        convert(self.timm_st, out, 18)
        cfg = get_config(opts=["MODEL.WEIGHTS", out, *LAYER_OFF])
        self.assertEqual(cfg.MODEL.CBAM_HRNET.NORM, "FrozenBN")
        model = build_model(cfg)
        SafeCheckpointer(model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
        model.eval()
        # the ImageNet statistics sit in the FrozenBN buffers: outputs equal timm's BN-eval network
        for got, want in zip(trunk_outputs(model, self.x).values(), self.expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    def test_missing_model_weights_names_the_key_and_how_to_get_the_file(self):
        cfg = get_config()  # the COCO recipe names a converted ImageNet file
        self.assertTrue(cfg.MODEL.WEIGHTS.endswith("hrnet_w18_in1k_d2.safetensors"))
        missing = self.path("nowhere/hrnet_w18_in1k_d2.safetensors")
        with self.assertRaises(FileNotFoundError) as err:
            SafeCheckpointer(build_model(self.cfg())).resume_or_load(missing, resume=False)
        text = str(err.exception)
        for part in (
            "MODEL.WEIGHTS",
            missing,
            "python tools/convert_hrnet_weights.py",
            "mask_rcnn_CBAM_HRNet_W18_FPN_1x_scratch.yaml",
        ):
            self.assertIn(part, text)
        self.assertTrue(
            os.path.isfile(os.path.join(CONFIGS, "mask_rcnn_CBAM_HRNet_W18_FPN_1x_scratch.yaml"))
        )

    def test_pretrained_key_loads_each_source_format(self):
        for src in (self.timm_pth, self.timm_st, self.official):
            with self.subTest(src=os.path.basename(src)):
                model = build_model(self.cfg(["MODEL.CBAM_HRNET.PRETRAINED", src]))
                self.assert_trunk_equals_timm(model)

    def test_pretrained_report_lists_loaded_and_unused(self):
        with self.assertLogs("cbam_hrnet_d2.modeling.hrnet_weights", "INFO") as logs:
            build_model(self.cfg(["MODEL.CBAM_HRNET.PRETRAINED", self.timm_pth]))
        text = "\n".join(logs.output)
        self.assertRegex(text, r"\d+ trunk tensors loaded")
        self.assertIn("in the file but unused: incre_modules", text)
        self.assertIn("CBAM, FPN and the detection heads start from random init", text)

    def test_model_weights_wins_over_pretrained_with_a_log_line(self):
        with self.assertLogs("cbam_hrnet_d2.modeling.backbone", "INFO") as logs:
            model = build_model(
                self.cfg(
                    ["MODEL.CBAM_HRNET.PRETRAINED", self.timm_pth, "MODEL.WEIGHTS", "some.pth"]
                )
            )
        self.assertIn("MODEL.WEIGHTS (some.pth) is set and wins", "\n".join(logs.output))
        got = trunk_outputs(model.eval(), self.x)["hr2"]
        self.assertFalse(torch.equal(got, self.expected[0]))

    def test_width_mismatch_names_both_widths(self):
        w32 = self.path("hrnet_w32.pth")
        torch.save(timm_classifier(32).state_dict(), w32)
        with self.assertRaisesRegex(
            ValueError, r"HRNet-W32 weights but the config builds HRNet-W18"
        ):
            build_model(self.cfg(["MODEL.CBAM_HRNET.PRETRAINED", w32]))
        with self.assertRaisesRegex(ValueError, r"hrnet_w32.pth holds HRNet-W32"):
            convert(w32, self.path("x.safetensors"), 18)

    def test_other_architecture_is_refused(self):
        resnet = self.path("resnet18.pth")
        torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), resnet)
        with self.assertRaisesRegex(ValueError, r"resnet18.pth is not an HRNet checkpoint"):
            build_model(self.cfg(["MODEL.CBAM_HRNET.PRETRAINED", resnet]))

    def test_truncated_file_names_the_file(self):
        data = open(self.timm_pth, "rb").read()
        bad = self.path("truncated.pth")
        with open(bad, "wb") as f:
            f.write(data[: len(data) // 3])
        with self.assertRaisesRegex(ValueError, r"truncated.pth: not a checkpoint or truncated"):
            build_model(self.cfg(["MODEL.CBAM_HRNET.PRETRAINED", bad]))
        with self.assertRaisesRegex(ValueError, r"truncated.pth"):
            SafeCheckpointer(build_model(self.cfg())).load(bad)

    def test_malicious_pickles_are_refused_and_run_nothing(self):
        for ext in (".pth", ".pkl"):
            with self.subTest(ext=ext):
                marker = self.path(f"pwned{ext}.txt")
                evil = self.path(f"evil{ext}")
                if ext == ".pth":
                    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Payload(marker)}, evil)
                else:
                    with open(evil, "wb") as f:
                        pickle.dump({"model": {}, "__author__": "x", "p": _Payload(marker)}, f)
                with self.assertRaisesRegex(ValueError, r"refused, the file .*would run code"):
                    SafeCheckpointer(build_model(self.cfg())).load(evil)
                with self.assertRaisesRegex(ValueError, "refused"):
                    build_model(self.cfg(["MODEL.CBAM_HRNET.PRETRAINED", evil]))
                with self.assertRaisesRegex(ValueError, "refused"):
                    convert(evil, self.path("y.safetensors"), 18)
                self.assertFalse(os.path.exists(marker), "unpickling ran the payload")

    def test_numpy_model_zoo_pkl_still_loads(self):
        sd = {"backbone.bottom_up.trunk." + k: v.numpy() for k, v in self.w18.state_dict().items()}
        zoo = self.path("zoo.pkl")
        with open(zoo, "wb") as f:
            pickle.dump({"model": sd, "__author__": "test"}, f)
        self.assertIn("model", load_tensor_file(zoo))
        model = build_model(self.cfg())
        SafeCheckpointer(model).load(zoo)
        self.assert_trunk_equals_timm(model)
