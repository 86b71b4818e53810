"""tools/export_model.py: the TorchScript and ONNX exports (ONNX run by ONNX Runtime and by OpenVINO
in f32) give the eager model's detections on images of other sizes than the sample and on an image
without detections; --run-eval gives train_net.py --eval-only's AP; the ONNX graph rewrite for
OpenVINO; bad arguments get clear errors."""

import contextlib
import io
import json
import math
import os
import re
import sys
import tempfile
import unittest
from unittest import mock

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from cbam_hrnet_d2.data import generate_shapes
from cbam_hrnet_d2.export import FORMATS, load_exported, load_sample_image
from cbam_hrnet_d2.export.onnx_graph import empty_constants_as_fills

from .common import SHAPES_CONFIG, get_config, load_tool
from .test_training import CONFIG, run_train_net

# Exported and eager models compute the same functions with other kernels (torchvision's RoIAlign
# instead of the sparse one, GroupNorm written for export, ONNX Runtime's convolutions), so in other
# summation orders: float32 rounding, amplified where GroupNorm divides by a near-zero variance (the
# uniform gray image) and through exp() of the box deltas. Measured (this test's model,
# classifier x10): boxes within 8e-3 px, scores 1.7e-3, mask probabilities 2.9e-5; elsewhere 1e-4.
BOX_TOL, SCORE_TOL, MASK_TOL = 5e-2, 5e-3, 1e-3


@pytest.mark.slow
class TestExport(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        d = cls.tmp.name
        root = os.path.join(d, "data")
        val_json = generate_shapes(root, "val", 4, seed=12)
        cls.data_opts = [
            "DATASETS.REGISTER_COCO", f"[['tiny_val', '{val_json}', '{root}/val']]",
            "DATASETS.TRAIN", "('tiny_val',)", "DATASETS.TEST", "('tiny_val',)",
        ]  # fmt: skip
        torch.manual_seed(0)
        # fp32 eager (the exports run float32; "auto" would run the heads in bf16 on a bf16 CPU)
        cls.cfg = get_config(CONFIG, [*cls.data_opts, "TEST.PRECISION", "fp32"])
        cls.model = build_model(cls.cfg).eval()
        # random-init class scores are all near 1/7: a larger classifier spreads them over images
        with torch.no_grad():
            cls.model.roi_heads.box_predictor.cls_score.weight.mul_(10)
        cls.weights = os.path.join(d, "model.pth")
        torch.save({"model": cls.model.state_dict()}, cls.weights)

        g = np.random.default_rng(0)
        cls.sample = os.path.join(root, "val", "000000.png")
        images = {
            "noise 96x160": g.integers(0, 255, (96, 160, 3), dtype=np.uint8),
            "shapes 200x136": cv2.resize(
                cv2.imread(os.path.join(root, "val", "000001.png")), (136, 200)
            ),
            "gray 128x128": np.full((128, 128, 3), 128, dtype=np.uint8),
            "dark 160x100": np.full((160, 100, 3), 20, dtype=np.uint8),
        }
        x = {"sample": load_sample_image(cls.cfg, cls.sample)}
        for name, array in images.items():
            path = os.path.join(d, name.split()[0] + ".png")
            cv2.imwrite(path, array)
            x[name] = load_sample_image(cls.cfg, path)
        cls.inputs = x
        # the image without detections: a score threshold between the lowest best score of an image
        # and the next (a constant of the traced graph, so set before exporting; the sample keeps
        # its detections so that the traced graph holds the mask head)
        cls.model.roi_heads.box_predictor.test_score_thresh = 0.0
        best = {name: cls.eager(t)[3].max().item() for name, t in x.items()}
        cls.empty = min((v, k) for k, v in best.items() if k != "sample")[1]
        others = min(v for k, v in best.items() if k != cls.empty)
        assert others - best[cls.empty] > 2 * SCORE_TOL, best  # holds for this seed
        cls.thresh = (best[cls.empty] + others) / 2
        cls.model.roi_heads.box_predictor.test_score_thresh = cls.thresh
        cls.opts = ["MODEL.WEIGHTS", cls.weights, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", cls.thresh]
        cls.opts += [
            "TEST.PRECISION",
            "fp32",
        ]  # as the eager model: TorchScript traces what it runs
        cls.tool = load_tool("export_model")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    @classmethod
    def eager(cls, image):
        with torch.no_grad():
            inst = cls.model.inference([{"image": image}], do_postprocess=False)[0]
        return inst.pred_boxes.tensor, inst.pred_classes, inst.pred_masks, inst.scores

    def export(self, fmt, *extra):
        out = os.path.join(self.tmp.name, fmt)
        args = ["--config-file", CONFIG, "--format", fmt, "--output", out, *extra]
        self.tool.main(args + self.data_opts + [str(o) for o in self.opts])
        return os.path.join(out, FORMATS[fmt])

    def check_equal_to_eager(self, fmt, runtime="onnxruntime", **kwargs):
        path = self.export(fmt, "--sample-image", self.sample)
        exported = load_exported(path, runtime, **kwargs)
        for name, x in self.inputs.items():
            with self.subTest(format=fmt, runtime=runtime, image=name):
                ref = self.eager(x)
                got = exported.run(x)
                boxes, classes, masks, scores, size = got
                self.assertEqual(tuple(size.tolist()), tuple(x.shape[1:]))
                self.assertEqual(len(scores), len(ref[3]))
                if name == self.empty:
                    self.assertEqual(len(scores), 0)
                else:
                    self.assertGreater(len(scores), 0)
                self.assertTrue(torch.equal(classes.long(), ref[1]))
                for a, b, tol in ((boxes, ref[0], BOX_TOL), (masks, ref[2], MASK_TOL)):
                    if len(a):
                        self.assertLessEqual((a - b).abs().max().item(), tol)
                if len(scores):
                    self.assertLessEqual((scores - ref[3]).abs().max().item(), SCORE_TOL)
                # the detectron2-style call: original size, masks pasted
                inst = exported([{"image": x, "height": 50, "width": 60}])[0]["instances"]
                self.assertEqual(inst.image_size, (50, 60))
                self.assertEqual(tuple(inst.pred_masks.shape[1:]), (50, 60))

    def test_torchscript_equals_eager_on_other_sizes_and_without_detections(self):
        self.check_equal_to_eager("torchscript")

    def test_onnx_runtime_equals_eager_on_other_sizes_and_without_detections(self):
        self.check_equal_to_eager("onnx")

    def test_openvino_f32_equals_eager_on_other_sizes_and_without_detections(self):
        self.check_equal_to_eager("onnx", "openvino", precision="f32")

    def test_run_eval_gives_the_eval_only_ap(self):
        ev = os.path.join(self.tmp.name, "eval_only")
        proc = run_train_net(["--eval-only", *self.data_opts, *self.opts, "OUTPUT_DIR", ev])
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        with open(os.path.join(ev, "results.json")) as f:
            eager = json.load(f)["tiny_val"]
        runs = [("onnx", "onnxruntime"), ("onnx", "openvino"), ("torchscript", "onnxruntime")]
        for fmt, runtime in runs:
            out = os.path.join(self.tmp.name, f"eval_{fmt}_{runtime}")
            args = ["--config-file", CONFIG, "--format", fmt, "--output", out, "--run-eval"]
            args += ["--runtime", runtime, "--ov-precision", "f32"] if fmt == "onnx" else []
            results = self.tool.main(args + self.data_opts + [str(o) for o in self.opts])
            for task in ("bbox", "segm"):
                with self.subTest(format=fmt, runtime=runtime, task=task):
                    a, b = eager[task]["AP"], results[task]["AP"]
                    self.assertTrue((math.isnan(a) and math.isnan(b)) or abs(a - b) <= 0.1, (a, b))


class TestExportErrors(unittest.TestCase):
    """The tool's errors, in-process (``main`` raises what the command line prints)."""

    tool = load_tool("export_model")

    def test_bad_format_lists_the_allowed_ones(self):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as ctx:
            self.tool.main(["--config-file", CONFIG, "--format", "caffe2", "--output", "x"])
        self.assertEqual(ctx.exception.code, 2)
        self.assertIn("invalid choice: 'caffe2'", err.getvalue())
        self.assertIn("'torchscript', 'onnx'", err.getvalue())

    def test_missing_sample_image_weights_and_unknown_key_are_named(self):
        with tempfile.TemporaryDirectory() as d:
            weights = os.path.join(d, "m.pth")
            torch.save({"model": {}}, weights)
            base = ["--config-file", CONFIG, "--output", d]
            nope = os.path.join(d, "nope.png")
            no_data = ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()"]
            cases = [
                ([*base, "--sample-image", nope, "MODEL.WEIGHTS", weights], "nope.png"),
                ([*base, "MODEL.WEIGHTS", ""], "MODEL.WEIGHTS is empty"),
                ([*base, "MODEL.WEIGHTS", weights, "MODEL.NOPE", "1"], "MODEL.NOPE"),
                ([*base, "MODEL.WEIGHTS", weights, *no_data], "DATASETS.TEST is empty"),
            ]
            for args, needle in cases:
                with self.subTest(args=args[-2:]):
                    with self.assertRaisesRegex(Exception, re.escape(needle)):
                        self.tool.main(args)
                    self.assertFalse(os.path.exists(os.path.join(d, "model.ts")))

    def test_openvino_runtime_needs_the_onnx_format(self):
        with self.assertRaisesRegex(ValueError, "--runtime openvino runs model.onnx: add --format"):
            self.tool.main(["--config-file", CONFIG, "--output", "x", "--runtime", "openvino"])

    def test_loading_a_missing_file_or_a_missing_runtime_says_what_to_do(self):
        with self.assertRaises(FileNotFoundError) as ctx:
            load_exported("/nonexistent/model.onnx")
        self.assertIn("/nonexistent/model.onnx", str(ctx.exception))
        self.assertIn("tools/export_model.py", str(ctx.exception))
        with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
            with mock.patch.dict(sys.modules, {"onnxruntime": None}):
                with self.assertRaises(ImportError) as ctx:
                    load_exported(f.name)
            self.assertIn("pip install -e .[deploy]", str(ctx.exception))
            with mock.patch.dict(sys.modules, {"openvino": None}):
                with self.assertRaises(ImportError) as ctx:
                    load_exported(f.name, "openvino")
            self.assertIn("pip install -e .[openvino]", str(ctx.exception))
            with self.assertRaisesRegex(ValueError, r"runtime 'tensorrt' is not supported"):
                load_exported(f.name, "tensorrt")
            with self.assertRaisesRegex(ValueError, r"OpenVINO precision 'fp16' .*'auto', 'f32'"):
                load_exported(f.name, "openvino", precision="fp16")

    def test_onnx_export_without_onnx_names_the_extra(self):
        from cbam_hrnet_d2.export.trace import _onnx_bytes

        with mock.patch.dict(sys.modules, {"onnx": None}):
            with self.assertRaisesRegex(ImportError, re.escape("pip install -e .[deploy]")):
                _onnx_bytes(None, None)  # fails at the import, before tracing anything


class _EmptyWhenNoneAbove(torch.nn.Module):
    """Indices of the values above 0.5, by decreasing value: torchvision's empty-input branch."""

    def forward(self, x):
        return _sorted_or_empty(x[x > 0.5]) + 1


@torch.jit._script_if_tracing
def _sorted_or_empty(x: torch.Tensor) -> torch.Tensor:
    if x.numel() == 0:  # what torchvision's batched_nms does
        return torch.empty((0,), dtype=torch.int64)
    return torch.argsort(x, descending=True)


class TestOnnxGraphForOpenVINO(unittest.TestCase):
    """The rewrite of empty If-branch constants: ONNX Runtime and OpenVINO both return nothing
    where nothing is above the threshold (OpenVINO 2026.4 returned one undefined value before)."""

    def test_empty_branch_comes_back_empty_under_both_runtimes(self):
        import onnx
        import onnxruntime as ort
        import openvino as ov

        buffer = io.BytesIO()
        torch.onnx.export(
            _EmptyWhenNoneAbove(), (torch.rand(6),), buffer, dynamo=False, opset_version=17,
            input_names=["x"], output_names=["k"], dynamic_axes={"x": {0: "n"}, "k": {0: "m"}},
        )  # fmt: skip
        graph = onnx.load_model_from_string(buffer.getvalue())
        self.assertEqual(empty_constants_as_fills(graph), 1)
        self.assertEqual(empty_constants_as_fills(graph), 0)  # nothing left to rewrite
        data = graph.SerializeToString()
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        compiled = ov.Core().compile_model(ov.Core().read_model(data, b""), "CPU")
        for x, want in (([0.9, 0.1, 0.7], [1, 2]), ([0.1, 0.2], [])):
            x = np.array(x, np.float32)
            with self.subTest(x=x):
                self.assertEqual(session.run(None, {"x": x})[0].tolist(), want)
                self.assertEqual(compiled({0: x})[0].tolist(), want)


class TestDetectron2TracingCheck(unittest.TestCase):
    """Detectron2's own tracing check (``TracingAdapter`` + ``torch.jit.trace``, then the traced
    outputs against eager) passes under every ``TEST.PRECISION``: a trace records what eager runs,
    autocast casts included (cbam_hrnet_d2/device.py)."""

    def traced_and_eager(self, precision):
        from detectron2.export import TracingAdapter

        torch.manual_seed(0)
        cfg = get_config(SHAPES_CONFIG, ["TEST.PRECISION", precision, "MODEL.WEIGHTS", ""])
        model = build_model(cfg).eval()
        model.roi_heads.box_predictor.test_score_thresh = 0.0  # a full set of detections
        inputs = [{"image": torch.rand(3, 128, 192, generator=torch.Generator().manual_seed(1))}]
        inputs[0]["image"] *= 255

        def inference(m, x):
            return [{"instances": m.inference(x, do_postprocess=False)[0]}]

        adapter = TracingAdapter(model, inputs, inference)
        with torch.no_grad():
            traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
            out = adapter.outputs_schema(traced(*adapter.flattened_inputs))[0]["instances"]
            ref = inference(model, inputs)[0]["instances"]
        return out, ref

    def test_traced_equals_eager_under_every_precision(self):
        from detectron2.utils.testing import assert_instances_allclose

        for precision in ("fp32", "bf16", "auto"):
            with self.subTest(precision=precision):
                out, ref = self.traced_and_eager(precision)
                self.assertEqual(len(out), len(ref))
                self.assertGreater(len(ref), 10)
                # the same detections; a random-init model's scores tie to 1e-5, so two equal
                # scores may come out in either order: matched by place, not by index
                dist = torch.cdist(out.pred_boxes.tensor, ref.pred_boxes.tensor, p=float("inf"))
                nearest, j = dist.min(1)
                self.assertLessEqual(nearest.max().item(), 1e-2)
                self.assertTrue(torch.equal(out.pred_classes, ref.pred_classes[j]))
                torch.testing.assert_close(out.scores, ref.scores[j], atol=1e-4, rtol=0)
                if precision != "auto":  # detectron2's check itself, where no ties flip
                    assert_instances_allclose(ref, out, size_as_tensor=True)
