"""The CUDA set: every path a GPU user takes, run where CUDA is present (``pytest -m cuda``,
tools/gpu_check.sh) and skipped with "CUDA not available" elsewhere.

Tests that need a trained model read it from ``$CBAM_HRNET_QUICKSTART`` (a ``model_final.pth`` of
the quickstart recipe; tools/gpu_check.sh trains one on the GPU first) and are skipped without it.
"""

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import unittest

import pytest
import torch
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.utils.events import EventStorage

from cbam_hrnet_d2.checkpoint import SafeCheckpointer
from cbam_hrnet_d2.engine.amp import trainer_class
from cbam_hrnet_d2.testing import calibrate_norm_statistics, synthetic_batch

from .common import DEFAULT_CONFIG, REPO, SHAPES_CONFIG, get_config, requires_cuda
from .test_preemption import PreemptionCase, final_weights
from .test_training import run_train_net

QUICKSTART = os.environ.get("CBAM_HRNET_QUICKSTART", "")
requires_model = unittest.skipIf(
    not os.path.isfile(QUICKSTART), "set CBAM_HRNET_QUICKSTART to a quickstart model_final.pth"
)


def tree_config(config_file=DEFAULT_CONFIG, opts=(), device="cpu"):
    """The config a CUDA test builds: ``MODEL.WEIGHTS`` empty, so it needs nothing the working tree
    does not hold (the GPU machine gets the tree alone: no ``weights/``, ``output/`` or dataset
    that tools/gpu_check.sh does not make)."""
    return get_config(config_file, [*opts, "MODEL.WEIGHTS", ""], device)


def relative_error(a, b):
    return ((a - b).abs().max() / a.abs().max().clamp(min=1.0)).item()


class TestCudaTestsNeedOnlyTheTree(unittest.TestCase):
    """Run on the CPU, everywhere: what the CUDA tests build must not need an ignored file."""

    def test_every_cuda_test_config_builds_a_predictor_in_an_empty_directory(self):
        from detectron2.engine import DefaultPredictor

        with tempfile.TemporaryDirectory() as d:
            self.enterContext(_chdir(d))  # no weights/ here, whatever the checkout holds
            for config in (DEFAULT_CONFIG, SHAPES_CONFIG):
                with self.subTest(config=os.path.basename(config)):
                    self.assertIsNotNone(DefaultPredictor(tree_config(config)).model)

    def test_the_cuda_tests_read_configs_only_through_tree_config(self):
        with open(__file__) as f:
            source = f.read()
        calls = re.findall(r"(?<![\w.])get_config\(", source)
        self.assertEqual(len(calls), 1, "tests/test_cuda.py: build configs with tree_config()")


@pytest.mark.cuda
@requires_cuda
class TestModelOnCuda(unittest.TestCase):
    def setUp(self):
        # TF32 would round convolutions to 10 mantissa bits: compare in full fp32
        self.enterContext(_no_tf32())

    def test_every_door_builds_a_cuda_model_that_runs_detectron2s_cuda_path(self):
        from detectron2.engine import DefaultPredictor

        cfg = tree_config(SHAPES_CONFIG, ["TEST.PRECISION", "bf16"], device="cuda")
        for door, model in (
            ("build_model", build_model(cfg)),
            ("DefaultPredictor", DefaultPredictor(cfg).model),
        ):
            with self.subTest(door=door):
                self.assertIs(type(model), GeneralizedRCNN)
                weight = model.backbone.bottom_up.trunk.conv1.weight
                self.assertTrue(weight.is_contiguous())  # NCHW, detectron2's layout
                self.check_cuda_path(model.eval())

    def check_cuda_path(self, model):
        """On CUDA inputs: no folded BatchNorm skipped, NCHW features, heads in fp32."""
        seen, calls = [], []
        fc = next(m for m in model.roi_heads.box_head.modules() if isinstance(m, torch.nn.Linear))
        handles = [fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))]
        handles += [
            m.register_forward_hook(lambda *a: calls.append(1))
            for m in model.backbone.modules()
            if "Norm" in type(m).__name__
        ]
        model.roi_heads.box_predictor.test_score_thresh = 0.0
        try:
            with torch.no_grad():
                features = model.backbone(torch.rand(1, 3, 128, 160, device="cuda"))
                model([{"image": torch.rand(3, 128, 160) * 255}])
        finally:
            for h in handles:
                h.remove()
        self.assertGreater(len(calls), 0)  # the trunk's norms ran: nothing folded
        self.assertTrue(features["p2"].is_contiguous())
        self.assertEqual(seen[:1], [torch.float32])  # heads as detectron2 runs them on CUDA

    def test_a_model_built_on_the_cpu_and_moved_runs_the_cuda_path(self):
        torch.manual_seed(0)
        cpu = build_model(tree_config(SHAPES_CONFIG, ["TEST.PRECISION", "bf16"])).eval()
        self.check_cuda_path(cpu.to("cuda"))

    def test_build_and_forward_on_the_gpu_equal_the_cpu_model(self):
        torch.manual_seed(0)
        x = torch.rand(1, 3, 256, 320) * 2 - 1
        cpu = build_model(tree_config()).eval()
        calibrate_norm_statistics(cpu.backbone, x)
        gpu = build_model(tree_config(device="cuda")).eval()
        gpu.load_state_dict(cpu.state_dict())
        self.assertEqual(next(gpu.parameters()).device.type, "cuda")
        self.assertIs(type(gpu), GeneralizedRCNN)
        with torch.no_grad():
            a, b = cpu.backbone(x), gpu.backbone(x.cuda())
        # float32 on both devices, different kernels and summation orders: measured under 1e-5
        # relative to the largest output; a wrong layer is off by O(1)
        for name in a:
            self.assertLess(relative_error(a[name], b[name].cpu()), 1e-3, name)

    def test_a_gpu_checkpoint_loads_on_the_cpu_and_back_with_the_same_outputs(self):
        torch.manual_seed(0)
        x = torch.rand(1, 3, 128, 160) * 2 - 1
        gpu = build_model(tree_config(SHAPES_CONFIG, device="cuda")).eval()
        with tempfile.TemporaryDirectory() as d:
            SafeCheckpointer(gpu, d).save("gpu")
            cpu = build_model(tree_config(SHAPES_CONFIG)).eval()
            SafeCheckpointer(cpu).load(os.path.join(d, "gpu.pth"))
            SafeCheckpointer(cpu, d).save("cpu")
            back = build_model(tree_config(SHAPES_CONFIG, device="cuda")).eval()
            SafeCheckpointer(back).load(os.path.join(d, "cpu.pth"))
        with torch.no_grad():
            on_gpu, on_cpu = gpu.backbone(x.cuda()), cpu.backbone(x)
            again = back.backbone(x.cuda())
        for name in on_gpu:
            self.assertTrue(torch.equal(on_gpu[name], again[name]), name)
            self.assertLess(relative_error(on_cpu[name], on_gpu[name].cpu()), 1e-3, name)


class _chdir:
    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self.saved = os.getcwd()
        os.chdir(self.path)

    def __exit__(self, *exc):
        os.chdir(self.saved)


class _no_tf32:
    def __enter__(self):
        self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


@pytest.mark.cuda
@requires_cuda
class TestTrainingStepsOnCuda(unittest.TestCase):
    def steps(self, amp: bool, precision: str = "auto", n: int = 20):
        """Total losses of ``n`` steps fitting one fixed batch on the GPU."""
        torch.manual_seed(0)
        cfg = tree_config(SHAPES_CONFIG, device="cuda")
        model = build_model(cfg).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        batch = synthetic_batch(4, 128, 192, num_instances=3)
        trainer = trainer_class(amp, "cuda", precision)(model, itertools.repeat(batch), opt)
        losses = []
        with EventStorage() as storage:
            for i in range(n):
                trainer.iter = i
                storage.iter = i
                trainer.run_step()
                losses.append(storage.history("total_loss").latest())
        return losses

    def check_falling(self, losses):
        self.assertTrue(all(torch.isfinite(torch.tensor(v)) for v in losses), losses)
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        self.assertLess(last, first * 0.9, losses)

    def test_fp32_steps_have_finite_falling_losses(self):
        self.check_falling(self.steps(amp=False))

    def test_amp_fp16_steps_have_finite_falling_losses(self):
        self.check_falling(self.steps(amp=True, precision="fp16"))

    def test_amp_bf16_steps_have_finite_falling_losses(self):
        self.check_falling(self.steps(amp=True, precision="bf16"))


@pytest.mark.cuda
@pytest.mark.slow
@requires_cuda
@requires_model
class TestEvalOnCuda(unittest.TestCase):
    """--eval-only of the quickstart model on shapes_val (200 images) on the GPU."""

    def setUp(self):
        self.tmp = self.enterContext(tempfile.TemporaryDirectory())

    def eval(self, name, opts=()):
        return _eval_shapes(os.path.join(self.tmp, name), opts)

    def test_eval_only_gives_bbox_and_segm_ap_and_half_precision_stays_within_half_an_ap(self):
        fp32 = self.eval("fp32", ["TEST.PRECISION", "fp32"])
        self.assertGreater(fp32["bbox"], 30)  # a trained model, not noise
        self.assertGreater(fp32["segm"], 30)
        for precision in ("fp16", "bf16"):
            with self.subTest(precision=precision):
                got = self.eval(precision, ["TEST.PRECISION", precision])
                for task in ("bbox", "segm"):
                    self.assertLessEqual(abs(got[task] - fp32[task]), 0.5, (task, got, fp32))


def _eval_shapes(out, opts):
    """--eval-only of $CBAM_HRNET_QUICKSTART with the shapes config on the GPU; {task: AP}."""
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", SHAPES_CONFIG]
    cmd += ["--eval-only"]
    cmd += ["MODEL.WEIGHTS", QUICKSTART, "OUTPUT_DIR", out, *[str(o) for o in opts]]
    cmd += ["MODEL.DEVICE", "cuda"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "results.json")) as f:
        tasks = next(iter(json.load(f).values()))
    return {task: tasks[task]["AP"] for task in ("bbox", "segm")}


@pytest.mark.cuda
@pytest.mark.slow
@requires_cuda
class TestRunsOnCuda(PreemptionCase):
    def test_sigterm_on_the_gpu_stops_with_a_checkpoint_and_resume_finishes(self):
        # 100 iterations: the signal, sent right after the first logged one, lands mid-run on a GPU
        common = self.exact_resume_opts(seed=7, max_iter=100, checkpoint_period=1000)
        out = self.out("gpu_stopped")
        rc, log = self.preempt(common, out, after_s=0.0, device="cuda")
        it = self.check_stopped(rc, log, out, signal.SIGTERM)
        proc = run_train_net(["--resume", *common, "OUTPUT_DIR", out], device="cuda")
        self.check(proc)
        self.assertIn(f"Starting training from iteration {it + 1}", proc.stdout + proc.stderr)
        self.assertIn(f"replayed {it + 1}/{it + 1} batches", proc.stdout + proc.stderr)
        self.assertTrue(all(torch.isfinite(v).all() for v in final_weights(out).values()))

    def test_a_gpu_run_resumes_with_fewer_visible_gpus(self):
        # saved with the GPU's RNG state; resumed where no GPU is visible (the extreme of
        # CUDA_VISIBLE_DEVICES=0 after an 8-GPU run): the state is skipped with a warning
        common = self.exact_resume_opts(seed=3, max_iter=6, checkpoint_period=3)
        out = self.out("gpu_fewer")
        self.check(run_train_net([*common, "SOLVER.MAX_ITER", 3, "OUTPUT_DIR", out], device="cuda"))
        saved = torch.load(
            os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=True
        )
        rng = saved["trainer"]["hooks"]["ExactResume"]["ranks"][0]
        self.assertIsInstance(rng["cuda"], torch.Tensor)  # this process's own GPU only
        proc = run_train_net(
            ["--resume", *common, "OUTPUT_DIR", out], device="cpu", env={"CUDA_VISIBLE_DEVICES": ""}
        )
        self.check(proc)
        self.assertIn("has no GPU: it is not restored", proc.stdout + proc.stderr)

    def test_two_cpu_processes_on_a_cuda_host(self):
        out = self.out("cpu_on_gpu_host")
        opts = [*self.data_opts, "SOLVER.MAX_ITER", 2, "SOLVER.IMS_PER_BATCH", 4]
        opts += ["TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()", "OUTPUT_DIR", out]
        proc = run_train_net(["--num-gpus", 2, *opts], device="cpu")
        self.check(proc)
        log = proc.stdout + proc.stderr
        self.assertIn("2 CPU processes (gloo)", log)
        self.assertIn("2 process(es) on this machine", log)
        self.assertTrue(os.path.isfile(os.path.join(out, "model_final.pth")))

    def test_more_gpus_than_visible_are_refused_before_anything_starts(self):
        n = torch.cuda.device_count() + 1
        proc = run_train_net(["--num-gpus", n, *self.data_opts], device="cuda")
        self.assertNotEqual(proc.returncode, 0)
        self.assertRegex(proc.stderr, rf"--num-gpus {n} .*MODEL.DEVICE cpu")
