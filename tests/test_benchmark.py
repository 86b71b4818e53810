import json
import os
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from cbam_hrnet_d2.device import native_bf16
from cbam_hrnet_d2.testing import synthetic_batch

from .common import DEFAULT_CONFIG, REPO, load_tool

BENCHMARK = os.path.join(REPO, "tools", "benchmark.py")
bench = load_tool("benchmark")
REFERENCE = bench.REFERENCE


def main(argv):
    """``tools/benchmark.py`` as a user runs it."""
    subprocess.run([sys.executable, BENCHMARK, *argv], check=True, cwd=REPO)


# a config with overrides in the same argument: the CPU speed layer off
PLAIN = (
    f"{DEFAULT_CONFIG} MODEL.CBAM_HRNET.CPU.CHANNELS_LAST False "
    "MODEL.CBAM_HRNET.CPU.SPARSE_ROI_ALIGN False "
    "MODEL.CBAM_HRNET.CPU.BF16_HEADS False"
)
# a bf16 row: measured where the CPU runs bf16 natively, listed as skipped where it emulates it
BF16 = f"{DEFAULT_CONFIG} TEST.PRECISION bf16"


@pytest.mark.slow
class TestBenchmark(unittest.TestCase):
    def test_one_run_measures_config_next_to_detectron2_r50(self):
        with tempfile.TemporaryDirectory() as d:
            main(
                [
                    "--configs",
                    DEFAULT_CONFIG,
                    PLAIN,
                    BF16,
                    "--size",
                    "64",
                    "96",
                    "--iters",
                    "1",
                    "--train-iters",
                    "1",
                    "--train-batch",
                    "1",
                    "--out",
                    d,
                    "--export-runtimes",
                    "onnxruntime",
                    "openvino",
                ]
            )
            with open(os.path.join(d, "benchmark.json")) as f:
                data = json.load(f)
            with open(os.path.join(d, "benchmark.md")) as f:
                md = f.read()
            self.assertTrue(os.path.isfile(os.path.join(d, "export", "model.onnx")))
        e2e = [
            f"{DEFAULT_CONFIG} end to end: {name}" for name in ("eager", "ONNX under onnxruntime")
        ]
        openvino = f"{DEFAULT_CONFIG} end to end: ONNX under openvino "
        openvino += "bf16" if native_bf16("cpu") else "f32"
        self.assertEqual(
            list(data["rows"]), [REFERENCE, DEFAULT_CONFIG, *e2e, openvino, PLAIN, BF16]
        )
        # the exported model does the eager model's work: the same detections, timed
        counts = {data["rows"][k]["detections"] for k in (*e2e, openvino)}
        self.assertEqual(len(counts), 1, counts)
        for key in (*e2e, openvino):
            self.assertGreater(data["rows"][key]["end_to_end_s"], 0)
        self.assertEqual(data["rows"][e2e[0]]["end_to_end_speedup_vs_eager"], 1.0)
        bf16 = data["rows"][BF16]
        self.assertEqual(bf16["precision"], "bf16")
        self.assertEqual(data["meta"]["bf16_native"], native_bf16("cpu"))
        if native_bf16("cpu"):
            self.assertGreater(bf16["backbone_fpn_s"], 0)
        else:
            self.assertIn("emulated", bf16["skipped"])
            self.assertNotIn("backbone_fpn_s", bf16)
            self.assertIn("emulated: no AVX512-BF16 / AMX", md)
        self.assertGreater(data["meta"]["matmul_peak_GMACs_bf16"], 0)
        self.assertGreater(data["meta"]["matmul_peak_GMACs"], 0)
        self.assertTrue(data["meta"]["large_allocations_in_heap"])  # as train_net.py runs on CPU
        self.assertEqual((data["meta"]["train_warmup"], data["meta"]["train_iters"]), (2, 1))
        self.assertIn("1 timed steps after 2", md)
        self.assertIn("large blocks in the heap", md)
        ref, ours = data["rows"][REFERENCE], data["rows"][DEFAULT_CONFIG]
        self.assertEqual(ref["model_speedup_vs_R50"], 1.0)
        for key in (
            "params_M",
            "backbone_fpn_GMAC",
            "model_GMAC",
            "backbone_fpn_s",
            "model_s",
            "train_s_per_iter",
            "train_peak_rss_mib",
            "trunk_peak_fraction",
        ):
            self.assertGreater(ours[key], 0, key)
        self.assertLess(ours["params_M"], ref["params_M"])  # W18 + FPN is smaller than R50 + FPN
        self.assertIn("mask_rcnn_CBAM_HRNet_W18_FPN_1x.yaml", md)
        self.assertIn(
            "mask_rcnn_CBAM_HRNet_W18_FPN_1x.yaml MODEL.CBAM_HRNET.CPU.CHANNELS_LAST False", md
        )
        self.assertEqual(data["rows"][PLAIN]["params_M"], ours["params_M"])


class TestFixedProposals(unittest.TestCase):
    def test_heads_train_on_the_same_fixed_boxes_and_rpn_losses_stay(self):
        torch.manual_seed(0)
        for config in (REFERENCE, DEFAULT_CONFIG):
            with self.subTest(config=config):
                model = build_model(bench.load_cfg(config)).train()
                model.proposal_generator = bench.FixedProposals(model.proposal_generator, 50)
                sampled = []
                model.roi_heads.box_predictor.register_forward_hook(
                    lambda m, i, o: sampled.append(i[0].shape[0])
                )
                batch = synthetic_batch(2, 64, 96, num_instances=2)
                with EventStorage():
                    images = model.preprocess_image(batch)
                    features = model.backbone(images.tensor)
                    gt = [b["instances"] for b in batch]
                    proposals, losses = model.proposal_generator(images, features, gt)
                    all_losses = model(batch)
                self.assertEqual([len(p) for p in proposals], [50, 50])
                self.assertTrue(
                    torch.equal(
                        proposals[0].proposal_boxes.tensor, proposals[1].proposal_boxes.tensor
                    )
                )
                self.assertEqual(set(losses), {"loss_rpn_cls", "loss_rpn_loc"})
                self.assertTrue(all(torch.isfinite(v) for v in all_losses.values()))
                # 50 proposals + 2 ground-truth boxes per image, fewer than 512 to sample
                self.assertEqual(sampled, [2 * 52])


class TestInterleavedTiming(unittest.TestCase):
    def test_every_round_runs_every_config_after_a_warm_up_round(self):
        calls = []
        timed = {
            c: {"a_s": lambda c=c: calls.append(c + "a"), "b_s": lambda c=c: calls.append(c + "b")}
            for c in ("x", "y")
        }
        seconds = bench.time_interleaved(timed, iters=3)
        # a warm-up round, then 3 rounds, each config's first callable once untimed before its timed
        # calls
        self.assertEqual(calls, ["xa", "xb", "ya", "yb"] + ["xa", "xa", "xb", "ya", "ya", "yb"] * 3)
        self.assertEqual(set(seconds), {"x", "y"})
        self.assertTrue(
            all(
                set(v) == {"first_calls_s", "a_s", "b_s"} and min(v.values()) >= 0
                for v in seconds.values()
            )
        )

    def test_inference_only_rows_are_not_trained_again(self):
        trains = bench._trains_differently
        self.assertTrue(trains("a.yaml"))
        self.assertTrue(trains("a.yaml MODEL.CBAM_HRNET.CPU.CHANNELS_LAST False"))
        self.assertFalse(trains("a.yaml TEST.PRECISION fp32"))
        self.assertFalse(trains("R50+cpu_speedups"))
        self.assertFalse(trains("R50+cpu_speedups+bf16"))


class TestTreatedReferenceAndEmulatedBf16(unittest.TestCase):
    def test_treated_r50_runs_fp32_with_the_cpu_speed_layer(self):
        row, timed = bench.prepare_inference(bench.REFERENCE_CL, 64, 96)
        self.assertEqual(row["precision"], "fp32")
        self.assertEqual(set(timed), {"backbone_fpn_s", "trunk_s", "model_s"})
        ref, _ = bench.prepare_inference(REFERENCE, 64, 96)
        self.assertEqual(row["params_M"], ref["params_M"])  # the same model, treated

    def test_bf16_rows_are_skipped_on_a_cpu_that_emulates_bf16_unless_asked(self):
        spec = (DEFAULT_CONFIG, ["TEST.PRECISION", "bf16"])
        with mock.patch.object(bench, "native_bf16", lambda device: False):
            row, timed = bench.prepare_inference(*spec[:1], 64, 96, spec[1], emulated_bf16=False)
            self.assertEqual((timed, row["precision"]), ({}, "bf16"))
            self.assertIn("emulated", row["skipped"])
            row, timed = bench.prepare_inference(*spec[:1], 64, 96, spec[1], emulated_bf16=True)
            self.assertNotIn("skipped", row)
            self.assertEqual(len(timed), 3)


def _child_peaks(queue):
    from cbam_hrnet_d2.utils.memory import peak_rss_mib

    before = peak_rss_mib()
    block = torch.ones(128 * 2**20 // 4)  # 128 MiB, touched
    during = peak_rss_mib()
    del block
    queue.put((before, during, peak_rss_mib()))


class TestPeakRSS(unittest.TestCase):
    def test_a_spawned_worker_reports_its_own_peak_not_its_parents(self):
        import multiprocessing as mp

        import psutil

        ballast = torch.ones(768 * 2**20 // 4)  # the parent holds 768 MiB more than the worker will
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_child_peaks, args=(queue,))
        proc.start()
        before, during, after = queue.get(timeout=300)
        proc.join()
        parent = psutil.Process().memory_info().rss / 2**20
        del ballast
        # ru_maxrss survives exec: it would read at least the parent's RSS here
        self.assertLess(before, parent - 500)
        self.assertGreaterEqual(during - before, 120)
        self.assertGreater(after, during - 1)  # freed memory still counts: a peak
