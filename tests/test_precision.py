"""TEST.PRECISION: fp32 unchanged bit for bit, bf16 runs the backbone + FPN in bfloat16 with float32
outputs and everything after them in float32, auto picks by hardware and input size, bad values
are refused with the key, the value and the allowed values."""

import io
import unittest
from unittest import mock

import torch
from detectron2.modeling import build_model

from cbam_hrnet_d2.device import native_bf16
from cbam_hrnet_d2.modeling.precision import AUTO_BF16_MIN_PIXELS, PRECISIONS, autocast_dtype
from cbam_hrnet_d2.testing import calibrate_norm_statistics

from .common import get_config


def build(precision, state=None):
    torch.manual_seed(0)
    model = build_model(get_config(opts=["TEST.PRECISION", precision])).eval()
    if state is not None:
        model.load_state_dict(state)
    return model


def conv_dtypes(model, x):
    """dtypes of the trunk's first output (hr2) and of the FPN's first output conv."""
    seen = []
    handles = [
        model.backbone.bottom_up.register_forward_hook(lambda m, i, o: seen.append(o["hr2"].dtype)),
        model.backbone.fpn_output2.register_forward_hook(lambda m, i, o: seen.append(o.dtype)),
    ]
    with torch.no_grad():
        out = model.backbone(x)
    for h in handles:
        h.remove()
    return seen, out


class TestPrecision(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.x = torch.rand(1, 3, 160, 224) * 2 - 1
        cls.fp32 = build("fp32")
        calibrate_norm_statistics(cls.fp32.backbone, cls.x)
        cls.bf16 = build("bf16", cls.fp32.state_dict())

    def test_fp32_is_detectron2s_fpn_bit_for_bit(self):
        with torch.no_grad():
            a = self.fp32.backbone(self.x)
            b = self.fp32.backbone.features(self.x)  # detectron2's FPN.forward, no precision code
        for name in a:
            self.assertTrue(torch.equal(a[name], b[name]), name)

    def test_bf16_runs_backbone_and_fpn_in_bfloat16_and_returns_float32(self):
        dtypes, out = conv_dtypes(self.bf16, self.x)
        self.assertEqual(dtypes, [torch.bfloat16, torch.bfloat16])
        self.assertTrue(all(v.dtype == torch.float32 for v in out.values()))
        # and the rest of the model in float32: the box head sees float32 features
        seen = []
        self.bf16.roi_heads.box_head.register_forward_hook(lambda m, i, o: seen.append(i[0].dtype))
        with torch.no_grad():
            self.bf16([{"image": torch.rand(3, 160, 224) * 255}])
        self.assertEqual(set(seen), {torch.float32})

    def test_bf16_stem_and_stage1_within_bfloat16_rounding(self):
        # bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); stem + stage 1 are 14
        # convs: measured 2.2% relative L2 error on a CPU with AVX512-BF16, tolerance 4%; a wrong
        # cast is off by O(1). The whole
        # random-init network amplifies rounding (20-45% at its outputs, a property of random
        # weights, not of bf16): the accuracy of bf16 is measured on a trained model
        # (docs/notes/precision-runs.md: shapes_val AP).
        layer1 = {}
        for model in (self.fp32, self.bf16):
            model.backbone.bottom_up.trunk.layer1.register_forward_hook(
                lambda m, i, o, model=model: layer1.__setitem__(id(model), o.float())
            )
            with torch.no_grad():
                model.backbone(self.x)
        a, b = layer1[id(self.fp32)], layer1[id(self.bf16)]
        self.assertLessEqual(((a - b).norm() / a.norm()).item(), 0.04)

    def test_training_mode_is_never_autocast(self):
        model = build("bf16", self.fp32.state_dict()).train()
        dtypes, _ = conv_dtypes(model, self.x)
        self.assertEqual(dtypes, [torch.float32, torch.float32])

    def test_auto_picks_bf16_only_on_native_hardware_for_large_inputs(self):
        small = torch.zeros(1, 3, 128, 192)
        self.assertLess(128 * 192, AUTO_BF16_MIN_PIXELS)
        self.assertIsNone(autocast_dtype("auto", small))
        large = torch.zeros(1, 3, 800, 1216)
        want = torch.bfloat16 if native_bf16(large.device) else None
        self.assertEqual(autocast_dtype("auto", large), want)
        self.assertEqual(get_config().TEST.PRECISION, "auto")

    def test_a_trace_keeps_the_precision_and_an_onnx_export_runs_float32(self):
        seen = []

        def f(x):
            seen.append(autocast_dtype("bf16", x))
            return x + 1

        x = torch.zeros(1, 3, 4, 4)
        torch.jit.trace(f, (x,), check_trace=False)  # records what eager runs
        self.assertEqual(seen, [torch.bfloat16])

        class M(torch.nn.Module):
            def forward(self, x):
                return f(x)

        torch.onnx.export(M(), (x,), io.BytesIO(), dynamo=False)
        self.assertEqual(seen[1:], [None])  # ONNX Runtime runs no bf16 convolutions
        self.assertEqual(autocast_dtype("bf16", x), torch.bfloat16)

    def test_bad_values_name_key_value_and_allowed_values(self):
        for value, needles in (
            ("int8", ["TEST.PRECISION", "'int8'", str(list(PRECISIONS))]),
            ("fp16", ["TEST.PRECISION = 'fp16' needs CUDA", "'bf16'"]),
        ):
            with self.subTest(value=value):
                with self.assertRaises(ValueError) as ctx:
                    build_model(get_config(opts=["TEST.PRECISION", value, "MODEL.DEVICE", "cpu"]))
                for needle in needles:
                    self.assertIn(needle, str(ctx.exception))


def _cpuinfo_flags():
    try:
        with open("/proc/cpuinfo") as f:
            line = next(line for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return None
    return set(line.split(":", 1)[1].split())


class TestEmulatedBf16(unittest.TestCase):
    """A CPU without AVX512-BF16 / AMX (e.g. AVX2-only AMD Zen 3) emulates bf16, 12-99x slower
    than fp32: "auto" must not pick it there, and an explicit request says what it costs."""

    def test_native_bf16_agrees_with_the_cpu_flags(self):
        flags = _cpuinfo_flags()
        if flags is None:
            self.skipTest("no /proc/cpuinfo on this OS")
        self.assertEqual(native_bf16("cpu"), bool(flags & {"avx512_bf16", "amx_bf16"}))

    def test_warning_names_the_key_and_the_fix_on_an_emulating_cpu_only(self):
        from cbam_hrnet_d2 import device as rules

        for native, warned in ((False, True), (True, False)):
            with (
                self.subTest(native=native),
                mock.patch.object(rules, "native_bf16", lambda device, n=native: n),
            ):
                with self.assertLogs("cbam_hrnet_d2.device", "WARNING") as logs:
                    rules.logger.warning("marker")
                    self.assertEqual(rules.warn_if_emulated_bf16("KEY = 1", "cpu"), warned)
                text = "\n".join(logs.output[1:])
                if warned:
                    for needle in ("KEY = 1", "emulated", "TEST.PRECISION 'auto'"):
                        self.assertIn(needle, text)
                else:
                    self.assertEqual(text, "")
        self.assertFalse(rules.warn_if_emulated_bf16("KEY = 1", "cuda"))

    def test_bf16_model_warns_once_at_its_first_eval_call_on_an_emulating_cpu(self):
        from cbam_hrnet_d2 import device

        model = build("bf16")
        x = torch.rand(1, 3, 64, 96)
        with mock.patch.object(device, "native_bf16", lambda device: False):
            with self.assertLogs("cbam_hrnet_d2.device", "WARNING") as logs:
                with torch.no_grad():
                    model.backbone(x)
                    model.backbone(x)
        self.assertEqual(len(logs.output), 1)
        self.assertIn("TEST.PRECISION = 'bf16'", logs.output[0])
