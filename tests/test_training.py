"""train_net.py end to end on a tiny generated dataset: train, checkpoint, --eval-only, --resume,
two CPU processes, and the errors for missing datasets and unknown keys."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

import pytest
import torch

from cbam_hrnet_d2.data import check_datasets, generate_shapes, register_coco_json

from .common import REPO, get_config

CONFIG = os.path.join(
    REPO, "configs/quick_schedules/mask_rcnn_CBAM_HRNet_W18_FPN_instant_test.yaml"
)


def run_train_net(args, env=None, timeout=600, wait=True, log=None, device="cpu"):
    """Run train_net.py on ``device``; with wait=False return the Popen, its output going to
    ``log`` (a path)."""
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", CONFIG]
    # CPU tests pin the CPU, also on a machine with CUDA (the last value of a key wins)
    cmd += [str(a) for a in args] + ["MODEL.DEVICE", device]
    full_env = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    if not wait:
        # never a pipe nobody reads: a full pipe would block the child
        with open(log or os.devnull, "ab") as out:
            return subprocess.Popen(
                cmd, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT
            )
    return subprocess.run(
        cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


class TrainingTestCase(unittest.TestCase):
    """A tiny train/val set, registered through DATASETS.REGISTER_COCO."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        root = os.path.join(cls.tmp.name, "data")
        train_json = generate_shapes(root, "train", 8, seed=11)
        val_json = generate_shapes(root, "val", 4, seed=12)
        cls.data_opts = [
            "DATASETS.REGISTER_COCO",
            f"[['tiny_train', '{train_json}', '{root}/train'], ['tiny_val', '{val_json}', "
            f"'{root}/val']]",
            "DATASETS.TRAIN",
            "('tiny_train',)",
            "DATASETS.TEST",
            "('tiny_val',)",
        ]

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def exact_resume_opts(self, *, seed, max_iter, checkpoint_period):
        """Options of a run that can be resumed exactly: fixed seed, no workers, no evaluation."""
        return self.data_opts + [
            "SEED", seed, "DATALOADER.NUM_WORKERS", 0, "DATALOADER.EXACT_RESUME", True,
            "SOLVER.MAX_ITER", max_iter, "SOLVER.CHECKPOINT_PERIOD", checkpoint_period,
            "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()",
        ]  # fmt: skip

    def out(self, name):
        return os.path.join(self.tmp.name, name)

    def kill_at_checkpoint(self, proc, out, name):
        """SIGKILL the training ``proc`` as soon as ``out/last_checkpoint`` names ``name``."""
        last = os.path.join(out, "last_checkpoint")
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if os.path.isfile(last) and open(last).read().strip() == name:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait()
        self.assertEqual(
            proc.returncode, -signal.SIGKILL, "training ended before it could be killed"
        )
        self.assertFalse(os.path.isfile(os.path.join(out, "model_final.pth")))

    def check(self, proc):
        self.assertEqual(proc.returncode, 0, proc.stdout[-3000:] + proc.stderr[-3000:])


@pytest.mark.slow
class TestTrainEvalResume(TrainingTestCase):
    def test_train_writes_checkpoint_metrics_and_ap_tables_then_eval_only_reproduces_ap(self):
        out = self.out("train")
        self.check(run_train_net(self.data_opts + ["OUTPUT_DIR", out]))
        for name in (
            "model_final.pth",
            "metrics.json",
            "ap_tables.md",
            "results.json",
            "last_checkpoint",
        ):
            self.assertTrue(os.path.isfile(os.path.join(out, name)), name)
        losses = [m["total_loss"] for m in read_metrics(out) if "total_loss" in m]
        self.assertTrue(losses and all(x == x and x < 1e4 for x in losses))
        with open(os.path.join(out, "results.json")) as f:
            trained = json.load(f)["tiny_val"]
        self.assertEqual(set(trained), {"bbox", "segm"})

        ev = self.out("eval")
        proc = run_train_net(
            ["--eval-only"]
            + self.data_opts
            + ["MODEL.WEIGHTS", os.path.join(out, "model_final.pth"), "OUTPUT_DIR", ev]
        )
        self.check(proc)
        self.assertIn("Evaluation results for bbox", proc.stdout + proc.stderr)
        self.assertIn("Evaluation results for segm", proc.stdout + proc.stderr)
        with open(os.path.join(ev, "results.json")) as f:
            evaluated = json.load(f)["tiny_val"]
        for task in ("bbox", "segm"):
            a, b = trained[task]["AP"], evaluated[task]["AP"]
            same = a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 0.1
            self.assertTrue(same, (task, a, b))

    def test_model_ema_trains_saves_the_average_and_keeps_the_raw_weights(self):
        from cbam_hrnet_d2.checkpoint import load_tensor_file

        out = self.out("ema")
        opts = ["CBAM_HRNET.EMA.ENABLED", True, "CBAM_HRNET.EMA.DECAY", 0.9, "DATASETS.TEST", "()"]
        proc = run_train_net(self.data_opts + opts + ["OUTPUT_DIR", out])
        self.check(proc)
        self.assertIn(
            "CBAM_HRNET.EMA: the model now holds the weights averaged", proc.stdout + proc.stderr
        )
        final = load_tensor_file(os.path.join(out, "model_final.pth"))
        ema = final["trainer"]["hooks"]["ModelEMA"]
        name = "roi_heads.box_predictor.cls_score.weight"
        self.assertTrue(torch.equal(final["model"][name], ema["shadow"][name]))
        self.assertFalse(torch.equal(final["model"][name], ema["raw"][name]))

    def test_resume_after_kill_restores_iteration_optimizer_and_lr(self):
        straight = self.out("straight")
        self.check(
            run_train_net(
                self.data_opts
                + ["OUTPUT_DIR", straight, "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()"]
            )
        )

        killed = self.out("killed")
        opts = self.data_opts + ["OUTPUT_DIR", killed, "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", "()"]
        proc = run_train_net(opts, wait=False)
        ckpt = os.path.join(killed, "model_0000003.pth")
        self.kill_at_checkpoint(proc, killed, "model_0000003.pth")
        self.assertTrue(os.path.isfile(ckpt))

        resumed = run_train_net(["--resume"] + opts)
        self.check(resumed)
        self.assertIn("Starting training from iteration 4", resumed.stdout + resumed.stderr)
        final = torch.load(
            os.path.join(killed, "model_final.pth"), map_location="cpu", weights_only=True
        )
        self.assertEqual(final["iteration"], 5)
        optimizer = final["trainer"]["_trainer"]["optimizer"]
        steps = {int(s["step"]) for s in optimizer["state"].values()}
        self.assertEqual(steps, {6}, "optimizer state was not restored (Adam step counts)")
        self.assertEqual(final["trainer"]["hooks"]["LRScheduler"]["last_epoch"], 6)
        lr = {m["iteration"]: m["lr"] for m in read_metrics(straight)}
        lr_resumed = {m["iteration"]: m["lr"] for m in read_metrics(killed)}
        self.assertAlmostEqual(lr_resumed[5], lr[5], places=12)
        self.assertLess(lr[5], 0.003 * 0.5, "STEPS (3,) should have lowered the LR")


@pytest.mark.slow
class TestMultiProcess(TrainingTestCase):
    def test_two_cpu_processes_train_with_syncbn_and_write_a_checkpoint(self):
        out = self.out("ddp")
        proc = run_train_net(
            ["--num-gpus", "2"]
            + self.data_opts
            + [
                "OUTPUT_DIR",
                out,
                "SOLVER.MAX_ITER",
                2,
                "SOLVER.IMS_PER_BATCH",
                4,
                "MODEL.CBAM_HRNET.NORM",
                "SyncBN",
                "TEST.EVAL_PERIOD",
                0,
                "DATASETS.TEST",
                "()",
            ]
        )
        self.check(proc)
        log = proc.stdout + proc.stderr
        self.assertIn("2 process(es) on this machine", log)
        self.assertTrue(os.path.isfile(os.path.join(out, "model_final.pth")))
        losses = [m["total_loss"] for m in read_metrics(out) if "total_loss" in m]
        self.assertTrue(losses and all(torch.isfinite(torch.tensor(x)) for x in losses))


@pytest.mark.slow
class TestOneRunPerFolder(TrainingTestCase):
    def test_a_second_launch_into_a_running_runs_folder_is_refused_naming_it(self):
        # what a cluster's requeue does while the first job still runs
        out = self.out("busy")
        opts = [*self.data_opts, "SOLVER.MAX_ITER", 200, "TEST.EVAL_PERIOD", 0, "OUTPUT_DIR", out]
        os.makedirs(out, exist_ok=True)
        first = run_train_net(opts, wait=False, log=os.path.join(out, "first.log"))
        self.addCleanup(first.kill)
        deadline = time.time() + 120
        while not os.path.isfile(os.path.join(out, "run.lock")) and time.time() < deadline:
            time.sleep(0.1)
        second = run_train_net(opts)
        self.assertEqual(second.returncode, 1, second.stderr[-2000:])
        self.assertIn(f"is in use by process {first.pid}", second.stderr)
        self.assertNotIn("Traceback", second.stderr)
        self.assertIsNone(first.poll(), "the first run must go on")
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=300)
        self.assertFalse(os.path.exists(os.path.join(out, "run.lock")))  # released at its exit


@pytest.mark.slow
class TestTwoMachines(unittest.TestCase):
    def test_each_machine_generates_the_shapes_set_on_its_own_disk(self):
        # two "machines" on this host (--num-machines 2, one CPU process each), each with its own
        # DETECTRON2_DATASETS: machine 1 must not wait for files only machine 0 wrote
        tmp = self.enterContext(tempfile.TemporaryDirectory())
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        procs = []
        for rank in (0, 1):
            args = ["--num-machines", 2, "--machine-rank", rank, "--dist-url"]
            args += [f"tcp://127.0.0.1:{port}", "SOLVER.MAX_ITER", 1, "SOLVER.IMS_PER_BATCH", 2]
            args += ["DATASETS.TEST", "()", "OUTPUT_DIR", os.path.join(tmp, f"out{rank}")]
            env = {"DETECTRON2_DATASETS": os.path.join(tmp, f"disk{rank}")}
            log = os.path.join(tmp, f"machine{rank}.log")
            procs.append((run_train_net(args, env=env, wait=False, log=log), log))
        for proc, log in procs:
            proc.wait(timeout=900)
            self.assertEqual(proc.returncode, 0, open(log).read()[-3000:])
        for rank in (0, 1):
            train = os.path.join(tmp, f"disk{rank}", "shapes", "train.json")
            self.assertTrue(os.path.isfile(train), f"machine {rank} has no shapes_train")


class TestErrors(unittest.TestCase):
    """The pre-flight check of train_net.py, in-process."""

    def test_missing_dataset_says_where_it_looked_and_how_to_fix(self):
        with tempfile.TemporaryDirectory() as d:
            json_file = os.path.join(d, "nowhere", "instances.json")
            register_coco_json("missing_files_test", json_file, os.path.join(d, "nowhere"))
            cfg = get_config(CONFIG, ["DATASETS.TRAIN", "('missing_files_test',)"])
            with self.assertRaises(FileNotFoundError) as err:
                check_datasets(cfg)
        text = str(err.exception)
        for part in ("missing_files_test", json_file, "$DETECTRON2_DATASETS", "datasets/README.md"):
            self.assertIn(part, text)

    def test_unregistered_dataset_name_is_refused(self):
        cfg = get_config(CONFIG, ["DATASETS.TRAIN", "('no_such_set',)"])
        with self.assertRaisesRegex(KeyError, r"'no_such_set'.*DATASETS.REGISTER_COCO"):
            check_datasets(cfg)
