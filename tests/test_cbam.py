import math
import unittest

import torch

from cbam_hrnet_d2.modeling.cbam import CBAM, record_attention


def _sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


class TestCBAM(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)

    def test_matches_hand_computation(self):
        # C=2, reduction 2 -> hidden 1; 3x3 spatial kernel; every weight fixed by hand.
        x = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]], [[0.0, 1.0], [-1.0, 2.0]]]])
        m = CBAM(2, reduction=2, kernel_size=3)
        w1, w2 = [0.5, -1.0], [1.0, 2.0]
        wk = [[[0.1 * (i + j + c) - 0.2 for j in range(3)] for i in range(3)] for c in range(2)]
        with torch.no_grad():
            m.channel_attention.fc1.weight.copy_(torch.tensor(w1).view(1, 2, 1, 1))
            m.channel_attention.fc2.weight.copy_(torch.tensor(w2).view(2, 1, 1, 1))
            m.spatial_attention.conv.weight.copy_(torch.tensor(wk).view(1, 2, 3, 3))
        out = m(x)

        xs = x[0].tolist()  # [c][i][j]
        avg = [sum(sum(r) for r in xs[c]) / 4 for c in range(2)]
        mx = [max(max(r) for r in xs[c]) for c in range(2)]

        def mlp(d):
            h = max(0.0, w1[0] * d[0] + w1[1] * d[1])
            return [w2[0] * h, w2[1] * h]

        ca = [_sigmoid(a + b) for a, b in zip(mlp(avg), mlp(mx))]
        y = [[[xs[c][i][j] * ca[c] for j in range(2)] for i in range(2)] for c in range(2)]
        maps = [
            [[sum(y[c][i][j] for c in range(2)) / 2 for j in range(2)] for i in range(2)],
            [[max(y[c][i][j] for c in range(2)) for j in range(2)] for i in range(2)],
        ]
        expected = [[[0.0] * 2 for _ in range(2)] for _ in range(2)]
        for i in range(2):
            for j in range(2):
                s = 0.0
                for c in range(2):
                    for di in range(3):
                        for dj in range(3):
                            ii, jj = i + di - 1, j + dj - 1
                            if 0 <= ii < 2 and 0 <= jj < 2:
                                s += wk[c][di][dj] * maps[c][ii][jj]
                sa = _sigmoid(s)
                for c in range(2):
                    expected[c][i][j] = y[c][i][j] * sa
        torch.testing.assert_close(out[0], torch.tensor(expected), rtol=1e-6, atol=1e-6)

    def test_output_shape_equals_input_shape(self):
        x = torch.randn(2, 36, 9, 13)
        self.assertEqual(CBAM(36)(x).shape, x.shape)

    def test_attention_maps_are_in_unit_interval_and_recorded(self):
        m = CBAM(72)
        x = torch.randn(2, 72, 8, 8) * 10
        with record_attention(m) as sites:
            m(x)
        att = sites[""].last_attention
        self.assertEqual(att["channel"].shape, (2, 72, 1, 1))
        self.assertEqual(att["spatial"].shape, (2, 1, 8, 8))
        for t in att.values():
            self.assertGreaterEqual(t.min().item(), 0.0)
            self.assertLessEqual(t.max().item(), 1.0)
        self.assertFalse(m.keep_attention)

    def test_attention_is_not_kept_outside_record_attention(self):
        m = CBAM(18)
        m(torch.randn(1, 18, 4, 4))
        self.assertIsNone(m.last_attention)

    def test_18_channels_with_reduction_16_has_hidden_width_1(self):
        m = CBAM(18, reduction=16)
        self.assertEqual(m.channel_attention.fc1.out_channels, 1)
        self.assertEqual(m(torch.randn(1, 18, 5, 5)).shape, (1, 18, 5, 5))

    def test_gradients_reach_every_parameter(self):
        m = CBAM(36, reduction=4)
        m(torch.randn(2, 36, 6, 6)).square().sum().backward()
        for name, p in m.named_parameters():
            self.assertIsNotNone(p.grad, name)
            self.assertGreater(p.grad.abs().sum().item(), 0, name)

    def test_bad_arguments_raise(self):
        with self.assertRaisesRegex(ValueError, "reduction"):
            CBAM(18, reduction=0)
        with self.assertRaisesRegex(ValueError, "kernel_size"):
            CBAM(18, kernel_size=4)
