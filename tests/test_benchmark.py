import json
import os
import tempfile
import unittest

from cbam_hrnet_d2.benchmark import REFERENCE, main

from .common import DEFAULT_CONFIG

# a config with overrides in the same argument: the speed options off
PLAIN = f"{DEFAULT_CONFIG} MODEL.HRNET.CHANNELS_LAST False MODEL.HRNET.FOLD_BN False"


class TestBenchmark(unittest.TestCase):
    def test_one_run_measures_config_next_to_detectron2_r50(self):
        with tempfile.TemporaryDirectory() as d:
            main(["--configs", DEFAULT_CONFIG, PLAIN, "--size", "64", "96", "--iters", "1",
                  "--train-iters", "1", "--train-batch", "1", "--out", d])
            with open(os.path.join(d, "benchmark.json")) as f:
                data = json.load(f)
            with open(os.path.join(d, "benchmark.md")) as f:
                md = f.read()
        self.assertEqual(list(data["rows"]), [REFERENCE, DEFAULT_CONFIG, PLAIN])
        self.assertGreater(data["meta"]["matmul_peak_GMACs"], 0)
        self.assertTrue(data["meta"]["large_allocations_in_heap"])  # as train_net.py runs on CPU
        self.assertIn("large blocks in the heap", md)
        ref, ours = data["rows"][REFERENCE], data["rows"][DEFAULT_CONFIG]
        self.assertEqual(ref["model_speedup_vs_R50"], 1.0)
        for key in ("params_M", "backbone_fpn_GMAC", "model_GMAC", "backbone_fpn_s", "model_s",
                    "train_s_per_iter", "train_peak_rss_mib", "trunk_peak_fraction"):
            self.assertGreater(ours[key], 0, key)
        self.assertLess(ours["params_M"], ref["params_M"])  # W18 + FPN is smaller than R50 + FPN
        self.assertIn("mask_rcnn_CBAM_HRNet_W18_FPN_1x.yaml", md)
        self.assertIn("mask_rcnn_CBAM_HRNet_W18_FPN_1x.yaml MODEL.HRNET.CHANNELS_LAST False", md)
        self.assertEqual(data["rows"][PLAIN]["params_M"], ours["params_M"])
