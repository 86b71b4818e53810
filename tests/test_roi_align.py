"""SparseROIAlign gives torchvision's RoIAlign results and gradients; the default configs use it."""

import itertools
import unittest

import torch
from detectron2.layers import ROIAlign
from detectron2.modeling import build_model
from detectron2.structures import Boxes
from torchvision.ops import roi_align

from cbam_hrnet_d2.cpu.process import keep_large_allocations_in_heap
from cbam_hrnet_d2.cpu.roi_align import SparseROIAlign, SparseROIAlignROIHeads, use_sparse_roi_align

from .common import get_config


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


class TestSparseROIAlignInTheModel(unittest.TestCase):
    def test_default_config_uses_it_and_the_stock_heads_give_the_same_outputs(self):
        cfg = get_config()
        self.assertEqual(cfg.MODEL.ROI_HEADS.NAME, "SparseROIAlignROIHeads")
        torch.manual_seed(0)
        ours = build_model(cfg).eval()
        self.assertIsInstance(ours.roi_heads, SparseROIAlignROIHeads)
        for pooler in (ours.roi_heads.box_pooler, ours.roi_heads.mask_pooler):
            self.assertTrue(all(type(p) is SparseROIAlign for p in pooler.level_poolers))
        stock = build_model(get_config(opts=["MODEL.ROI_HEADS.NAME", "StandardROIHeads"])).eval()
        self.assertTrue(all(type(p) is ROIAlign for p in stock.roi_heads.box_pooler.level_poolers))
        stock.load_state_dict(ours.state_dict())

        g = torch.Generator().manual_seed(0)
        x = torch.rand(1, 3, 128, 160, generator=g) * 2 - 1
        boxes = [Boxes(random_rois(1, 128, 160, 1.0, 30, g)[:, 1:])]
        with torch.no_grad():
            features = ours.backbone(x)
            feats = [features[f] for f in ours.roi_heads.box_in_features]
            for name in ("box_pooler", "mask_pooler"):
                a = getattr(stock.roi_heads, name)(feats, boxes)
                b = getattr(ours.roi_heads, name)(feats, boxes)
                # relative to the map's scale: random-init FPN maps reach ~1e4, and float32 sums in
                # another order differ by a few ulps of that
                self.assertLessEqual(((a - b).abs().max() / a.abs().max()).item(), 1e-5)

    def test_use_sparse_roi_align_replaces_only_roialign(self):
        module = torch.nn.Sequential(ROIAlign((7, 7), 0.25, 2, aligned=False), torch.nn.ReLU())
        use_sparse_roi_align(module)
        self.assertIs(type(module[0]), SparseROIAlign)
        self.assertEqual(
            (module[0].spatial_scale, module[0].sampling_ratio, module[0].aligned), (0.25, 2, False)
        )
        self.assertIs(type(module[1]), torch.nn.ReLU)


class TestHeapAllocations(unittest.TestCase):
    def test_glibc_setting_is_accepted(self):
        # on glibc (this project's Linux machines) mallopt accepts both settings; idempotent
        self.assertTrue(keep_large_allocations_in_heap())
        self.assertTrue(keep_large_allocations_in_heap())
        big = torch.ones(64, 2**18)  # 64 MiB: from the heap now, still an ordinary tensor
        self.assertEqual(big.sum().item(), 64 * 2**18)


if __name__ == "__main__":
    unittest.main()
