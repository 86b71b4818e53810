"""The speed options (MODEL.HRNET.CHANNELS_LAST, MODEL.HRNET.FOLD_BN, the sparse CPU RoIAlign of
MODEL.ROI_HEADS.NAME SparseROIAlignROIHeads) give the plain model's results."""

import unittest

import torch
from detectron2.modeling import build_model

from cbam_hrnet_d2.cpu.fold_bn import FoldedTrunk, conv_bn_pairs
from cbam_hrnet_d2.fixed_work import FixedWork, calibrate_norm_statistics

from .common import get_config

PLAIN = [
    "MODEL.HRNET.CHANNELS_LAST",
    False,
    "MODEL.HRNET.FOLD_BN",
    False,
    "MODEL.ROI_HEADS.NAME",
    "StandardROIHeads",
]
H, W = 160, 224


def build_pair(opts=()):
    """(plain model, model with the speed options on), same weights and BN statistics, eval mode."""
    torch.manual_seed(0)
    fast = build_model(get_config(opts=list(opts)))
    calibrate_norm_statistics(fast.backbone, torch.rand(1, 3, H, W) * 2 - 1)
    plain = build_model(get_config(opts=list(opts) + PLAIN))
    plain.load_state_dict(fast.state_dict())
    return plain.eval(), fast.eval()


# float32 rounding of folded vs unfolded BatchNorm and of the kernels each memory layout picks,
# through ~100 layers of a random network: measured 1.2e-4 (relative to the largest output) on an
# AVX2-only CPU (2026-12-01), under 1e-4 on an AVX512 one; a wrong fold or layout is off by O(1)
def assert_close(test, a, b, tol=5e-4):
    scale = a.abs().max().clamp(min=1.0)
    test.assertLessEqual(((a - b).abs().max() / scale).item(), tol)


class TestSpeedOptionsKeepResults(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.plain, cls.fast = build_pair()
        cls.x = torch.rand(1, 3, H, W) * 2 - 1

    def test_defaults_are_on_and_weights_are_channels_last(self):
        cfg = get_config()
        self.assertTrue(cfg.MODEL.HRNET.CHANNELS_LAST and cfg.MODEL.HRNET.FOLD_BN)
        w = self.fast.backbone.bottom_up.trunk.conv1.weight
        self.assertTrue(w.is_contiguous(memory_format=torch.channels_last))
        self.assertFalse(
            self.plain.backbone.bottom_up.trunk.conv1.weight.is_contiguous(
                memory_format=torch.channels_last
            )
        )

    @staticmethod
    def box_deltas(model, x):
        work = FixedWork(model, H, W, 200, 20)
        roi = model.roi_heads
        features = model.backbone(x)
        pooled = roi.box_pooler([features[f] for f in roi.box_in_features], [work.boxes])
        return roi.box_predictor(roi.box_head(pooled))[1]

    def test_backbone_fpn_and_whole_model_outputs_equal_the_plain_model(self):
        with torch.no_grad():
            pa, pb = self.plain.backbone(self.x), self.fast.backbone(self.x)
            for name in pa:
                assert_close(self, pa[name], pb[name])
            sa, ma = FixedWork(self.plain, H, W, 200, 20)(self.x)
            sb, mb = FixedWork(self.fast, H, W, 200, 20)(self.x)
            da, db = (self.box_deltas(m, self.x) for m in (self.plain, self.fast))
        assert_close(self, sa, sb)
        assert_close(self, ma, mb)
        assert_close(self, da, db)
        # the folded trunk was really used: it has no BatchNorm left
        folded = self.fast.backbone.bottom_up._folded.view
        self.assertIsNotNone(folded)
        self.assertFalse(any("BatchNorm" in type(m).__name__ for m in folded.modules()))

    def test_predictions_equal_the_plain_model(self):
        image = {"image": torch.rand(3, H, W) * 255, "height": H, "width": W}
        with torch.no_grad():
            a, b = self.plain([image])[0]["instances"], self.fast([image])[0]["instances"]
        self.assertEqual(len(a), len(b))
        self.assertGreater(len(a), 0)
        assert_close(self, a.scores, b.scores)

        def canonical(inst):
            # random-init scores tie often; order ties by class and box so that the two lists align
            rows = torch.cat(
                [
                    inst.scores[:, None].mul(1e3).round(),
                    inst.pred_classes[:, None].float(),
                    inst.pred_boxes.tensor.round(),
                ],
                1,
            ).tolist()
            order = sorted(range(len(rows)), key=lambda i: rows[i])
            return inst.pred_boxes.tensor[order]

        # The network's outputs hold 1e-4 (test above, box deltas included), but decoding amplifies
        # the ~1e-5 differences through exp() of random-init deltas (up to log(1000/16)): final
        # boxes of this random model agree within 1% of the image size.
        self.assertLessEqual((canonical(a) - canonical(b)).abs().max().item(), 1e-2 * max(H, W))

    def test_folded_trunk_follows_new_weights(self):
        plain, fast = build_pair()
        with torch.no_grad():
            fast.backbone(self.x)  # builds the folded trunk's structure
            state = fast.state_dict()
            for k in state:
                if k.endswith("running_var") or k.endswith("conv2.weight"):
                    state[k] = state[k] * 1.5
            fast.load_state_dict(state)
            plain.load_state_dict(state)
            pa, pb = plain.backbone(self.x), fast.backbone(self.x)
        for name in pa:
            self.assertTrue(torch.isfinite(pa[name]).all())
            assert_close(self, pa[name], pb[name])

    def test_autograd_in_eval_mode_uses_the_trainable_trunk(self):
        _, fast = build_pair()
        out = fast.backbone(self.x)
        sum(v.sum() for v in out.values()).backward()
        trainable = [p for p in fast.backbone.bottom_up.trunk.parameters() if p.requires_grad]
        self.assertTrue(trainable)
        self.assertTrue(all(p.grad is not None for p in trainable))

    def test_eval_outputs_do_not_depend_on_grad_mode(self):
        _, fast = build_pair()
        with torch.no_grad():
            a = fast.backbone(self.x)
        b = fast.backbone(self.x)
        for name in a:
            self.assertTrue(torch.equal(a[name], b[name].detach()), name)

    def test_training_mode_outputs_equal_the_plain_model(self):
        # against the plain model evaluated in float64: two float32 runs of this random-init net
        # differ by up to ~1e-4 from rounding alone (each ~6e-5 from the float64 result)
        plain, fast = build_pair()
        plain.double().train(), fast.train()
        with torch.no_grad():
            pa, pb = plain.backbone(self.x.double()), fast.backbone(self.x)
        for name in pa:
            assert_close(self, pa[name], pb[name].double())


class TestFoldBatchnorm(unittest.TestCase):
    def test_counts_and_equality_on_a_conv_bn_pair(self):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        (
            m[1].running_mean.uniform_(-1, 1),
            m[1].running_var.uniform_(0.5, 2),
            m[1].weight.data.uniform_(0.5, 2),
        )
        m.eval()
        self.assertEqual(conv_bn_pairs(m), [("0", "1")])
        fold = FoldedTrunk()
        x = torch.randn(2, 3, 9, 9)
        with torch.no_grad():
            assert_close(self, m(x), fold(m, x), 1e-5)
        self.assertIsInstance(fold.view[1], torch.nn.Identity)

    def test_gn_trunk_is_left_alone(self):
        plain, fast = build_pair(["MODEL.HRNET.NORM", "GN"])
        x = torch.rand(1, 3, H, W)
        with torch.no_grad():
            pa, pb = plain.backbone(x), fast.backbone(x)
        self.assertEqual(fast.backbone.bottom_up._folded.pairs, [])
        for name in pa:
            assert_close(self, pa[name], pb[name])

    def test_a_bn_not_known_to_follow_its_conv_is_not_folded(self):
        class Misordered(torch.nn.Module):
            """conv_b is registered right before bn_a, but bn_a follows conv_a in forward."""

            def __init__(self):
                super().__init__()
                self.conv_a = torch.nn.Conv2d(3, 4, 3, padding=1)
                self.conv_b = torch.nn.Conv2d(4, 4, 3, padding=1)
                self.bn_a = torch.nn.BatchNorm2d(4)

            def forward(self, x):
                return [self.conv_b(self.bn_a(self.conv_a(x)))]

        torch.manual_seed(0)
        m = Misordered().eval()
        m.bn_a.running_mean.uniform_(-1, 1), m.bn_a.running_var.uniform_(0.5, 2)
        self.assertEqual(conv_bn_pairs(m), [])
        x = torch.randn(1, 3, 8, 8)
        with torch.no_grad():
            self.assertTrue(torch.equal(FoldedTrunk()(m, x)[0], m(x)[0]))

    def test_every_batchnorm_of_the_hrnet_trunk_is_folded(self):
        trunk = build_pair()[1].backbone.bottom_up.trunk
        bns = [n for n, m in trunk.named_modules() if "BatchNorm" in type(m).__name__]
        self.assertEqual(sorted(bn for _, bn in conv_bn_pairs(trunk)), sorted(bns))


class TestActivationCheckpointing(unittest.TestCase):
    """MODEL.HRNET.ACTIVATION_CHECKPOINTING: same outputs and gradients, fewer kept activations."""

    X = torch.rand(2, 3, 128, 160) * 2 - 1

    def build(self, on: bool, opts=()):
        torch.manual_seed(0)
        model = build_model(get_config(opts=["MODEL.HRNET.ACTIVATION_CHECKPOINTING", on, *opts]))
        return model.backbone.bottom_up

    def pair(self):
        on, off = self.build(True), self.build(False)
        calibrate_norm_statistics(on, self.X)
        off.load_state_dict(on.state_dict())  # strict: the class swap kept every key
        return on.train(), off.train()

    def test_on_by_default_for_frozen_bn_and_off_for_batchnorm(self):
        from cbam_hrnet_d2.modeling.hrnet import _RecomputedHRModule

        def recomputed(trunk):
            return sum(isinstance(m, _RecomputedHRModule) for m in trunk.modules())

        self.assertEqual(recomputed(self.build(True)), 8)  # 1 + 4 + 3 modules of stages 2..4
        with self.assertLogs("cbam_hrnet_d2.modeling.backbone", "INFO") as logs:
            bn_trunk = self.build(
                True, ["MODEL.HRNET.NORM", "SyncBN", "MODEL.BACKBONE.FREEZE_AT", 0]
            )
        self.assertEqual(recomputed(bn_trunk), 0)
        self.assertIn("would update its statistics twice", "\n".join(logs.output))
        self.assertIn("MODEL.HRNET.NORM FrozenBN or GN", "\n".join(logs.output))

    def test_batchnorm_modules_are_left_unchanged_by_the_library_function_too(self):
        # one policy (issue 16): recompute_hrnet_modules skips what the config path skips
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
            assert_close(self, outs[0][name].detach(), outs[1][name].detach(), 1e-6)
        grads = dict(on.named_parameters())
        checked = 0
        for name, p in off.named_parameters():
            if p.requires_grad:
                assert_close(self, grads[name].grad, p.grad, 1e-5)
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


class TestCompiledTrunk(unittest.TestCase):
    def test_compiled_folded_trunk_gives_the_eager_outputs_and_follows_new_weights(self):
        _, eager = build_pair()
        fast = build_model(get_config(opts=["MODEL.HRNET.COMPILE", True])).eval()
        x = torch.rand(1, 3, H, W) * 2 - 1
        trunk = fast.backbone.bottom_up._folded
        with torch.no_grad():
            for scale in (1.0, 1.5):  # the compiled graph reads the new folded weights
                state = eager.state_dict()
                state = {
                    k: v * scale if k.endswith("conv2.weight") else v for k, v in state.items()
                }
                eager.load_state_dict(state)
                fast.load_state_dict(state)
                a, b = eager.backbone(x), fast.backbone(x)
                self.assertIsNotNone(trunk._compiled)
                for name in a:
                    # inductor fuses and reorders float32 operations: rounding-level differences
                    assert_close(self, a[name], b[name])
        # with autograd the trunk runs eagerly (the compiled graph has no backward)
        out = fast.backbone(x)
        self.assertTrue(all(v.requires_grad for v in out.values()))

    def test_compile_without_fold_bn_names_both_keys(self):
        cfg = get_config(opts=["MODEL.HRNET.COMPILE", True, "MODEL.HRNET.FOLD_BN", False])
        with self.assertRaisesRegex(ValueError, r"MODEL.HRNET.COMPILE.*MODEL.HRNET.FOLD_BN True"):
            build_model(cfg)
