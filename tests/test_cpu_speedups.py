"""The CPU speed-ups (cbam_hrnet_d2/cpu, MODEL.CBAM_HRNET.CPU.*): owned by the backbone (channels-
last) and by the registered RPN and RoI heads (sparse RoIAlign, bf16 heads), each
decided per call from the device of its inputs, so a model built for CUDA runs them on CPU tensors
and detectron2's GeneralizedRCNN stays the meta-architecture; each switch on its own; and the model
they speed up gives the plain model's results: SparseROIAlign equals torchvision's RoIAlign (forward
and gradients), channels-last changes no output; bf16 heads
change nothing under fp32 and stay within bf16 rounding of the fp32 heads under bf16."""

import itertools
import os
import unittest

import torch
from detectron2.layers import ROIAlign
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, build_model
from torchvision.ops import roi_align

from cbam_hrnet_d2.cpu.bf16_heads import HEADS, heads_dtype
from cbam_hrnet_d2.cpu.process import keep_large_allocations_in_heap
from cbam_hrnet_d2.cpu.roi_align import SparseROIAlign, use_sparse_roi_align
from cbam_hrnet_d2.testing import calibrate_norm_statistics

from .common import CONFIGS, get_config, load_tool

H, W = 160, 224
SWITCHES = ("CHANNELS_LAST", "SPARSE_ROI_ALIGN", "BF16_HEADS")
ALL_OFF = [x for key in SWITCHES for x in (f"MODEL.CBAM_HRNET.CPU.{key}", False)]


def build_for(cfg, device):
    """The model the config builds for ``device``, left on the CPU (detectron2's ``build_model``
    would then move it to ``device``)."""
    cfg = cfg.clone()
    cfg.MODEL.DEVICE = device
    return META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)


def build_pair(opts=(), device="cpu"):
    """(plain model: every MODEL.CBAM_HRNET.CPU switch off, the same model with them on), same
    weights and BN statistics, eval mode, built for ``device``; fp32 unless ``opts`` set
    TEST.PRECISION (bf16 heads: :class:`TestBf16Heads`)."""
    torch.manual_seed(0)
    cfg = get_config(opts=["TEST.PRECISION", "fp32", *opts])
    plain = build_for(get_config(opts=["TEST.PRECISION", "fp32", *opts, *ALL_OFF]), device)
    calibrate_norm_statistics(plain.backbone, torch.rand(1, 3, H, W) * 2 - 1)
    fast = build_for(cfg, device)
    fast.load_state_dict(plain.state_dict())
    return plain.eval(), fast.eval()


def fixed_work(model):
    return load_tool("benchmark").FixedWork(model, H, W, 200, 20)


# float32 rounding of the kernels each memory layout picks,
# through ~100 layers of a random network: measured 1.2e-4 (relative to the largest output) on an
# AVX2-only CPU, under 1e-4 on an AVX512 one; a wrong layout is off by O(1)
def assert_close(test, a, b, tol=5e-4):
    scale = a.abs().max().clamp(min=1.0)
    test.assertLessEqual(((a - b).abs().max() / scale).item(), tol)


def layer_state(model):
    """Which CPU speed-ups ``model`` takes on CPU inputs."""
    bottom_up = model.backbone.bottom_up
    return {
        "channels_last": bottom_up.cpu_channels_last,
        "sparse_roi_align": any(isinstance(m, SparseROIAlign) for m in model.modules()),
        "bf16_heads": model.roi_heads.bf16_heads and model.proposal_generator.bf16_heads,
    }


class TestSpeedUpsAreDecidedPerCall(unittest.TestCase):
    def test_the_meta_architecture_is_detectron2s_own(self):
        self.assertIs(type(build_model(get_config())), GeneralizedRCNN)

    def test_a_model_built_for_cuda_runs_the_cpu_speedups_on_cpu_tensors(self):
        # a CUDA config's model, moved to the CPU: it runs what the CPU should (NHWC)
        plain, fast = build_pair(device="cuda")
        state = layer_state(fast)
        self.assertTrue(state["channels_last"] and state["sparse_roi_align"])
        x = torch.rand(1, 3, H, W) * 2 - 1
        with torch.no_grad():
            out = fast.backbone(x)
        self.assertTrue(out["p2"].is_contiguous(memory_format=torch.channels_last))
        with torch.no_grad():
            ref = plain.backbone(x)
        self.assertFalse(ref["p2"].is_contiguous(memory_format=torch.channels_last))
        for name in ref:
            assert_close(self, ref[name], out[name])

    def test_a_lazyconfig_model_has_the_same_switches_whatever_train_device(self):
        from detectron2.config import LazyConfig, instantiate

        cfg = LazyConfig.load(os.path.join(CONFIGS, "lazy", "mask_rcnn_cbam_hrnet_w18_fpn.py"))
        for device in ("cpu", "cuda"):
            with self.subTest(device=device):
                cfg.train.device = device
                model = instantiate(cfg.model)
                self.assertIs(type(model), GeneralizedRCNN)
                state = layer_state(model)
                self.assertTrue(state["sparse_roi_align"], state)
                self.assertTrue(state["channels_last"], state)

    def test_each_switch_turns_its_speedup_off_alone(self):
        for key in SWITCHES:
            with self.subTest(key=key):
                opts = [f"MODEL.CBAM_HRNET.CPU.{key}", False, "TEST.PRECISION", "bf16"]
                model = build_model(get_config(opts=opts))
                on = layer_state(model)
                self.assertEqual({k: v for k, v in on.items() if not v}, {key.lower(): False})


def random_rois(n_images, h, w, scale, count, generator):
    """Boxes in input coordinates, some partly or wholly outside the map, some degenerate."""
    size = torch.tensor([w / scale, h / scale])
    xy = torch.rand(count, 2, generator=generator) * size * 1.2 - size * 0.1
    wh = torch.rand(count, 2, generator=generator) * size * 0.5
    wh[: count // 8] = 0  # zero-size boxes
    batch = torch.randint(0, n_images, (count, 1), generator=generator).float()
    return torch.cat([batch, xy, xy + wh], 1)


class TestSparseROIAlignEqualsTorchvision(unittest.TestCase):
    def test_forward_and_input_gradient_match(self):
        g = torch.Generator().manual_seed(0)
        cases = itertools.product(
            [True, False],  # aligned
            [0, 1, 2],  # sampling_ratio (0 = adaptive)
            [(7, 7), (14, 14), (5, 3)],
            [torch.contiguous_format, torch.channels_last],
        )
        for aligned, ratio, out, fmt in cases:
            with self.subTest(aligned=aligned, sampling_ratio=ratio, output=out, format=fmt):
                n, c, h, w, scale = 3, 6, 19, 27, 0.25
                x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=fmt)
                rois = random_rois(n, h, w, scale, 40, g)
                grad = torch.randn(len(rois), c, *out, generator=g)
                xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
                ref = roi_align(xa, rois, out, scale, ratio, aligned)
                got = SparseROIAlign(out, scale, ratio, aligned)(xb, rois)
                self.assertEqual(got.shape, ref.shape)
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
                ref.backward(grad)
                got.backward(grad)
                torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)

    def test_float64_and_no_boxes(self):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, 10, 12, dtype=torch.float64, generator=g)
        rois = random_rois(2, 10, 12, 0.5, 10, g).double()
        got = SparseROIAlign((7, 7), 0.5, 0, True)(x, rois)
        self.assertEqual(got.dtype, torch.float64)
        torch.testing.assert_close(
            got, roi_align(x, rois, (7, 7), 0.5, 0, True), rtol=1e-10, atol=1e-10
        )
        empty = SparseROIAlign((7, 7), 0.5, 0, True)(x.float(), torch.zeros(0, 5))
        self.assertEqual(tuple(empty.shape), (0, 4, 7, 7))

    def test_batch_index_outside_the_batch_is_refused(self):
        with self.assertRaisesRegex(ValueError, r"rois\[:, 0\] must lie in \[0, 1\)"):
            SparseROIAlign((7, 7), 1.0, 0, True)(
                torch.zeros(1, 2, 8, 8), torch.tensor([[1.0, 0, 0, 4, 4]])
            )

    def test_use_sparse_roi_align_replaces_only_roialign(self):
        module = torch.nn.Sequential(ROIAlign((7, 7), 0.25, 2, aligned=False), torch.nn.ReLU())
        use_sparse_roi_align(module)
        self.assertIs(type(module[0]), SparseROIAlign)
        self.assertEqual(
            (module[0].spatial_scale, module[0].sampling_ratio, module[0].aligned), (0.25, 2, False)
        )
        self.assertIs(type(module[1]), torch.nn.ReLU)


class TestSpeedOptionsKeepResults(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.plain, cls.fast = build_pair()
        cls.x = torch.rand(1, 3, H, W) * 2 - 1

    def test_every_speedup_is_on_by_default_and_weights_stay_nchw(self):
        cfg = get_config()
        self.assertTrue(all(cfg.MODEL.CBAM_HRNET.CPU.values()))
        # channels-last is a per-call choice: the weights keep detectron2's layout (and so does a
        # model moved to CUDA)
        w = self.fast.backbone.bottom_up.trunk.conv1.weight
        self.assertTrue(w.is_contiguous())
        for pooler in (self.fast.roi_heads.box_pooler, self.fast.roi_heads.mask_pooler):
            self.assertTrue(all(type(p) is SparseROIAlign for p in pooler.level_poolers))
        for pooler in (self.plain.roi_heads.box_pooler, self.plain.roi_heads.mask_pooler):
            self.assertTrue(all(type(p) is ROIAlign for p in pooler.level_poolers))

    @staticmethod
    def box_deltas(model, x):
        work = fixed_work(model)
        roi = model.roi_heads
        features = model.backbone(x)
        pooled = roi.box_pooler([features[f] for f in roi.box_in_features], [work.boxes])
        return roi.box_predictor(roi.box_head(pooled))[1]

    def test_checkpoints_move_between_the_cpu_model_and_the_plain_one(self):
        # the plain model is what a CUDA config builds: same keys, the weights load either way
        plain, fast = build_pair()
        self.assertEqual(sorted(plain.state_dict()), sorted(fast.state_dict()))
        other = build_model(get_config())
        other.load_state_dict(fast.state_dict())
        for k, v in other.state_dict().items():
            self.assertTrue(torch.equal(v, plain.state_dict()[k]), k)

    def test_backbone_fpn_and_whole_model_outputs_equal_the_plain_model(self):
        with torch.no_grad():
            pa, pb = self.plain.backbone(self.x), self.fast.backbone(self.x)
            for name in pa:
                assert_close(self, pa[name], pb[name])
            sa, ma = fixed_work(self.plain)(self.x)
            sb, mb = fixed_work(self.fast)(self.x)
            da, db = (self.box_deltas(m, self.x) for m in (self.plain, self.fast))
        assert_close(self, sa, sb)
        assert_close(self, ma, mb)
        assert_close(self, da, db)

    def test_predictions_equal_the_plain_model(self):
        g = torch.Generator().manual_seed(3)
        image = {"image": torch.rand(3, H, W, generator=g) * 255, "height": H, "width": W}
        with torch.no_grad():
            a, b = self.plain([image])[0]["instances"], self.fast([image])[0]["instances"]
        self.assertGreater(len(a), 50)
        self.assertLessEqual(abs(len(a) - len(b)), 2)
        # ~100 low-confidence detections of a random-init model: their order ties often, and
        # where two boxes overlap at NMS's threshold a rounding-level difference may keep the other
        # one. So: nearly every detection of one has one of the same class and score in the other
        # at the same place (within 1% of the image size: decoding amplifies the ~1e-5 output
        # differences through exp() of random-init deltas). A wrong speed-up moves all of them.
        for x, y in ((a, b), (b, a)):
            same = (x.pred_classes[:, None] == y.pred_classes[None]) & (
                (x.scores[:, None] - y.scores[None]).abs() <= 1e-3
            )
            dist = torch.cdist(x.pred_boxes.tensor, y.pred_boxes.tensor, p=float("inf"))
            nearest = dist.masked_fill(~same, float("inf")).min(1).values
            self.assertGreaterEqual((nearest <= 1e-2 * max(H, W)).float().mean().item(), 0.95)

    def test_autograd_in_eval_mode_uses_the_trainable_trunk(self):
        _, fast = build_pair()
        out = fast.backbone(self.x)
        sum(v.sum() for v in out.values()).backward()
        trainable = [p for p in fast.backbone.bottom_up.trunk.parameters() if p.requires_grad]
        self.assertTrue(trainable)
        self.assertTrue(all(p.grad is not None for p in trainable))

    def test_training_mode_outputs_equal_the_plain_model(self):
        # against the plain model evaluated in float64: two float32 runs of this random-init net
        # differ by up to ~1e-4 from rounding alone (each ~6e-5 from the float64 result)
        plain, fast = build_pair()
        plain.double().train(), fast.train()
        with torch.no_grad():
            pa, pb = plain.backbone(self.x.double()), fast.backbone(self.x)
        for name in pa:
            assert_close(self, pa[name], pb[name].double())


# bf16 keeps 8 bits of mantissa (relative rounding 4e-3 per value); through the heads' 2-6 layers of
# a random-init model (this file's) they differ from fp32 by a few 1e-3 of their largest value
# (measured on an AVX512-BF16 CPU: 3.4e-3 scores, 2.1e-3 mask probabilities, 1.6e-3 box
# deltas); a head left in fp32 differs by 0, a wrong cast by O(1)
BF16_TOL = 2e-2


class TestBf16Heads(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.x = torch.rand(1, 3, H, W) * 2 - 1
        _, cls.bf16 = build_pair(["TEST.PRECISION", "bf16"])
        off = ["TEST.PRECISION", "bf16", "MODEL.CBAM_HRNET.CPU.BF16_HEADS", False]
        _, cls.fp32_heads = build_pair(off)

    def inner_dtypes(self, model, run):
        """{head: dtype of its first conv / linear output} while ``run()`` runs."""
        seen, handles = {}, []

        def record(name):
            def hook(module, args, out):
                seen.setdefault(name, out.dtype)

            return hook

        for name, (parent, attr) in HEADS.items():
            head = getattr(getattr(model, parent), attr)
            layers = (torch.nn.Conv2d, torch.nn.Linear)
            inner = next(m for m in head.modules() if isinstance(m, layers))
            handles.append(inner.register_forward_hook(record(name)))
        try:
            run()
        finally:
            for h in handles:
                h.remove()
        return seen

    def test_heads_run_bf16_and_hand_float32_on(self):
        with torch.no_grad():
            seen = self.inner_dtypes(self.bf16, lambda: fixed_work(self.bf16)(self.x))
            scores, masks = fixed_work(self.bf16)(self.x)
        self.assertEqual(seen, {name: torch.bfloat16 for name in HEADS})
        self.assertEqual((scores.dtype, masks.dtype), (torch.float32, torch.float32))

    def test_within_bf16_rounding_of_fp32_heads(self):
        with torch.no_grad():
            sa, ma = fixed_work(self.fp32_heads)(self.x)
            sb, mb = fixed_work(self.bf16)(self.x)
            da, db = (
                TestSpeedOptionsKeepResults.box_deltas(m, self.x)
                for m in (self.fp32_heads, self.bf16)
            )
        for a, b in ((sa, sb), (ma, mb), (da, db)):
            assert_close(self, a, b, BF16_TOL)
        self.assertFalse(torch.equal(sa, sb))  # the heads really ran in bf16

    def test_fp32_changes_nothing_bit_for_bit(self):
        plain, fast = build_pair()  # TEST.PRECISION fp32, BF16_HEADS on
        for parent, attr in HEADS.values():
            head = getattr(getattr(fast, parent), attr)
            self.assertFalse(head._forward_pre_hooks or head._forward_hooks)
        self.assertIsNone(heads_dtype("fp32"))

    def test_training_mode_runs_float32(self):
        self.bf16.train()
        try:
            seen = self.inner_dtypes(
                self.bf16, lambda: self.bf16.roi_heads.box_head(torch.rand(4, 256, 7, 7))
            )
        finally:
            self.bf16.eval()
        self.assertEqual(seen, {"box_head": torch.float32})

    def test_auto_is_bf16_exactly_where_the_cpu_runs_it_natively(self):
        from cbam_hrnet_d2.device import native_bf16

        self.assertEqual(heads_dtype("auto"), torch.bfloat16 if native_bf16("cpu") else None)
        self.assertEqual(heads_dtype("bf16"), torch.bfloat16)


class TestHeapAllocations(unittest.TestCase):
    def test_glibc_setting_is_accepted(self):
        # on glibc (this project's Linux machines) mallopt accepts both settings; idempotent
        self.assertTrue(keep_large_allocations_in_heap())
        self.assertTrue(keep_large_allocations_in_heap())
        big = torch.ones(64, 2**18)  # 64 MiB: from the heap now, still an ordinary tensor
        self.assertEqual(big.sum().item(), 64 * 2**18)
