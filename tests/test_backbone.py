import unittest

import torch
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone, build_model
from torch import nn

from cbam_hrnet_d2 import CBAM, CBAMFPN
from cbam_hrnet_d2.modeling.hrnet import HRNET_FEATURES, HRNET_STAGES, hrnet_branch_channels
from cbam_hrnet_d2.testing import calibrate_norm_statistics

from .common import get_config


def _assert_close(test, a, b, tol):
    scale = a.abs().max().clamp(min=1.0)
    test.assertLessEqual(((a - b).abs().max() / scale).item(), tol)


TRUNK = ["MODEL.BACKBONE.NAME", "build_cbam_hrnet_backbone"]


def build(opts=()):
    torch.manual_seed(0)
    return build_backbone(get_config(opts=list(opts)), ShapeSpec(channels=3))


class TestTrunk(unittest.TestCase):
    def test_outputs_match_output_shape_for_each_width(self):
        x = torch.rand(2, 3, 64, 96)
        for width in (18, 32, 48):
            with self.subTest(width=width):
                model = build(TRUNK + ["MODEL.CBAM_HRNET.WIDTH", width]).eval()
                shapes = model.output_shape()
                self.assertEqual(list(shapes), list(HRNET_FEATURES))
                self.assertEqual([s.stride for s in shapes.values()], [4, 8, 16, 32])
                self.assertEqual(
                    [s.channels for s in shapes.values()], hrnet_branch_channels(width)
                )
                with torch.no_grad():
                    out = model(x)
                self.assertEqual(list(out), model._out_features)
                for name, t in out.items():
                    s = shapes[name]
                    self.assertEqual(
                        tuple(t.shape), (2, s.channels, 64 // s.stride, 96 // s.stride)
                    )

    def test_w18_branch_channels(self):
        self.assertEqual(hrnet_branch_channels(18), [18, 36, 72, 144])

    def test_trunk_and_fpn_report_size_divisibility_32(self):
        self.assertEqual(build(TRUNK).size_divisibility, 32)
        self.assertEqual(build().size_divisibility, 32)

    def test_trunk_has_no_classifier_or_incre_layers(self):
        # state_dict, not parameters: FrozenBN norms hold buffers only
        names = {n.split(".")[1] for n in build(TRUNK).state_dict() if n.startswith("trunk.")}
        self.assertEqual(names, {m for group in HRNET_STAGES for m in group})

    def test_cbam_on_every_branch_by_default(self):
        model = build(TRUNK)
        self.assertEqual(sorted(model.cbam), list(HRNET_FEATURES))

    def test_cbam_branches_selects_sites(self):
        model = build(TRUNK + ["MODEL.CBAM.BRANCHES", ["hr3", "hr5"]])
        self.assertEqual(sorted(model.cbam), ["hr3", "hr5"])

    def test_disabled_cbam_gives_bare_trunk_output(self):
        # (the CPU speed-ups off: channels-last kernels round differently from the bare trunk)
        off = ["MODEL.CBAM_HRNET.CPU.CHANNELS_LAST", False]
        model = build(TRUNK + ["MODEL.CBAM.ENABLED", False, *off]).eval()
        self.assertFalse(any(isinstance(m, CBAM) for m in model.modules()))
        x = torch.rand(1, 3, 64, 64)
        with torch.no_grad():
            out = model(x)
            raw = model.trunk(x)
        for name, t in zip(HRNET_FEATURES, raw):
            torch.testing.assert_close(out[name], t, rtol=0, atol=0)

    def test_enabled_cbam_changes_trunk_output(self):
        model = build(TRUNK).eval()
        x = torch.rand(1, 3, 64, 64)
        with torch.no_grad():
            out, raw = model(x), model.trunk(x)
        self.assertFalse(torch.allclose(out["hr2"], raw[0]))

    def test_freeze_at_freezes_exactly_the_promised_stages(self):
        for freeze_at in range(len(HRNET_STAGES) + 1):
            with self.subTest(freeze_at=freeze_at):
                model = build(
                    TRUNK + ["MODEL.BACKBONE.FREEZE_AT", freeze_at, "MODEL.CBAM_HRNET.NORM", "BN"]
                )
                frozen = {m for group in HRNET_STAGES[:freeze_at] for m in group}
                for name, p in model.named_parameters():
                    parts = name.split(".")
                    is_frozen = parts[0] == "trunk" and parts[1] in frozen
                    self.assertEqual(p.requires_grad, not is_frozen, name)
                for name, m in model.trunk.named_modules():
                    if name and name.split(".")[0] in frozen and "bn" in name.split(".")[-1]:
                        self.assertIsInstance(m, FrozenBatchNorm2d, name)
                trainable_bn = [
                    m
                    for n, m in model.trunk.named_modules()
                    if n and n.split(".")[0] not in frozen and isinstance(m, FrozenBatchNorm2d)
                ]
                self.assertEqual(trainable_bn, [])

    def test_each_norm_builds_and_runs(self):
        expected = {
            "BN": nn.BatchNorm2d,
            "SyncBN": nn.BatchNorm2d,
            "FrozenBN": FrozenBatchNorm2d,
            "GN": nn.GroupNorm,
        }
        for norm, cls in expected.items():
            with self.subTest(norm=norm):
                model = build(
                    TRUNK + ["MODEL.CBAM_HRNET.NORM", norm, "MODEL.BACKBONE.FREEZE_AT", 0]
                )
                self.assertIsInstance(model.trunk.bn1, cls)
                self.assertIsInstance(model.trunk.stage4[0].branches[0][0].bn1, cls)
                out = model(torch.rand(2, 3, 64, 64))
                self.assertTrue(all(torch.isfinite(t).all() for t in out.values()))

    def test_group_norm_uses_groups_dividing_branch_width(self):
        model = build(TRUNK + ["MODEL.CBAM_HRNET.NORM", "GN"])
        gn = model.trunk.stage4[0].branches[0][0].bn1
        self.assertEqual((gn.num_channels, gn.num_groups), (18, 18))


class TestFPN(unittest.TestCase):
    def test_fpn_outputs_p2_to_p6_with_256_channels_on_odd_sizes(self):
        model = build().eval()
        for h, w in ((200, 249), (64, 96)):
            x = torch.rand(1, 3, h, w)
            # GeneralizedRCNN pads to size_divisibility; do the same here
            ph, pw = -(-h // 32) * 32, -(-w // 32) * 32
            x = nn.functional.pad(x, (0, pw - w, 0, ph - h))
            with torch.no_grad():
                out = model(x)
            self.assertEqual(list(out), ["p2", "p3", "p4", "p5", "p6"])
            for name, t in out.items():
                stride = model.output_shape()[name].stride
                self.assertEqual(tuple(t.shape), (1, 256, -(-ph // stride), -(-pw // stride)))

    def test_position_fpn_puts_cbam_on_p2_to_p6_only(self):
        model = build(["MODEL.CBAM.POSITION", "fpn"])
        self.assertIsInstance(model, CBAMFPN)
        self.assertEqual(sorted(model.cbam), ["p2", "p3", "p4", "p5", "p6"])
        self.assertEqual(len(model.bottom_up.cbam), 0)
        self.assertEqual(sum(isinstance(m, CBAM) for m in model.modules()), 5)

    def test_position_branches_puts_cbam_on_trunk_only(self):
        model = build()
        self.assertNotIsInstance(model, CBAMFPN)
        self.assertEqual(sum(isinstance(m, CBAM) for m in model.modules()), 4)


class TestActivationCheckpointing(unittest.TestCase):
    """MODEL.CBAM_HRNET.ACTIVATION_CHECKPOINTING: same outputs and gradients, fewer kept
    activations."""

    X = torch.rand(2, 3, 128, 160) * 2 - 1

    def build(self, on: bool, opts=()):
        torch.manual_seed(0)
        model = build_model(
            get_config(opts=["MODEL.CBAM_HRNET.ACTIVATION_CHECKPOINTING", on, *opts])
        )
        return model.backbone.bottom_up

    def pair(self):
        on, off = self.build(True), self.build(False)
        calibrate_norm_statistics(on, self.X)
        off.load_state_dict(on.state_dict())  # strict: the class swap kept every key
        return on.train(), off.train()

    def test_applied_to_frozen_bn_and_not_to_batchnorm(self):
        from cbam_hrnet_d2.modeling.hrnet import _RecomputedHRModule

        def recomputed(trunk):
            return sum(isinstance(m, _RecomputedHRModule) for m in trunk.modules())

        self.assertEqual(recomputed(self.build(True)), 8)  # 1 + 4 + 3 modules of stages 2..4
        with self.assertLogs("cbam_hrnet_d2.modeling.backbone", "INFO") as logs:
            bn_trunk = self.build(
                True, ["MODEL.CBAM_HRNET.NORM", "SyncBN", "MODEL.BACKBONE.FREEZE_AT", 0]
            )
        self.assertEqual(recomputed(bn_trunk), 0)
        self.assertIn("would update its statistics twice", "\n".join(logs.output))
        self.assertIn("MODEL.CBAM_HRNET.NORM FrozenBN or GN", "\n".join(logs.output))

    def test_batchnorm_modules_are_left_unchanged_by_the_library_function_too(self):
        # one policy: recompute_hrnet_modules skips what the config path skips
        from cbam_hrnet_d2.modeling.hrnet import (
            _RecomputedHRModule,
            build_hrnet_trunk,
            recompute_hrnet_modules,
        )

        trunk = build_hrnet_trunk(18, norm="BN")
        count, skipped = recompute_hrnet_modules(trunk)
        self.assertEqual((count, len(skipped)), (0, 8))
        self.assertFalse(any(isinstance(m, _RecomputedHRModule) for m in trunk.modules()))
        frozen = build_hrnet_trunk(18, norm="FrozenBN")
        self.assertEqual(recompute_hrnet_modules(frozen), (8, []))

    def test_outputs_and_gradients_equal_without_checkpointing(self):
        on, off = self.pair()
        outs = []
        for model in (on, off):
            out = model(self.X)
            sum(o.square().mean() for o in out.values()).backward()
            outs.append(out)
        for name in outs[0]:
            _assert_close(self, outs[0][name].detach(), outs[1][name].detach(), 1e-6)
        grads = dict(on.named_parameters())
        checked = 0
        for name, p in off.named_parameters():
            if p.requires_grad:
                _assert_close(self, grads[name].grad, p.grad, 1e-5)
                checked += 1
        self.assertGreater(checked, 100)

    def test_keeps_less_than_half_the_activations(self):
        def kept_bytes(model):
            total = 0

            def pack(t):
                nonlocal total
                total += t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(self.X)
            return total

        on, off = self.pair()
        self.assertLess(kept_bytes(on), 0.5 * kept_bytes(off))
