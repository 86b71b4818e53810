"""Failure behaviour: SIGKILL during training (checkpoint writes included) and non-finite losses."""

import os
import random
import shutil
import signal
import time

import pytest
import torch

from cbam_hrnet_d2.checkpoint.checkpointer import load_tensor_file

from .test_training import TrainingTestCase, run_train_net


def _assert_checkpoints_loadable(test, out):
    last = os.path.join(out, "last_checkpoint")
    if not os.path.exists(last):
        return None
    name = open(last).read().strip()
    data = load_tensor_file(os.path.join(out, name))  # raises if truncated
    test.assertIn("model", data)
    for f in os.listdir(out):
        if f.endswith(".pth") and not f.startswith("."):
            load_tensor_file(os.path.join(out, f))
    return name


@pytest.mark.slow
class TestKilledTraining(TrainingTestCase):
    def test_repeated_sigkill_never_leaves_a_broken_checkpoint_and_resume_finishes(self):
        out = self.out("killed")
        opts = self.data_opts + [
            "OUTPUT_DIR",
            out,
            "SOLVER.MAX_ITER",
            12,
            "SOLVER.CHECKPOINT_PERIOD",
            1,
            "TEST.EVAL_PERIOD",
            0,
            "DATASETS.TEST",
            "()",
        ]
        rng = random.Random(0)
        kills = 0
        for attempt in range(8):
            proc = run_train_net((["--resume"] if attempt else []) + opts, wait=False)
            # wait until training is under way (a checkpoint newer than the last one), then kill
            # at a random moment, often in the middle of a checkpoint write
            before = _assert_checkpoints_loadable(self, out)
            deadline = time.time() + 240
            while proc.poll() is None and time.time() < deadline:
                now = (
                    open(os.path.join(out, "last_checkpoint")).read().strip()
                    if os.path.exists(os.path.join(out, "last_checkpoint"))
                    else None
                )
                if now != before:
                    time.sleep(rng.uniform(0.0, 1.5))
                    break
                time.sleep(0.02)
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            _assert_checkpoints_loadable(self, out)
        print(
            f"SIGKILL loop: survived {kills} kills, every checkpoint loadable after each"
        )  # pytest -rP
        self.assertGreaterEqual(kills, 4)
        proc = run_train_net(["--resume"] + opts)
        self.assertEqual(proc.returncode, 0, proc.stdout[-3000:] + proc.stderr[-3000:])
        # the newest complete checkpoint is of the last iteration: model_final.pth, or
        # model_0000011.pth when the kill fell between the two saves of the last iteration
        # (detectron2 then resumes at MAX_ITER and has nothing left to do)
        last = _assert_checkpoints_loadable(self, out)
        self.assertIn(last, ("model_final.pth", "model_0000011.pth"))
        self.assertEqual(load_tensor_file(os.path.join(out, last))["iteration"], 11)


@pytest.mark.slow
class TestExactResume(TrainingTestCase):
    def test_killed_and_resumed_run_ends_with_the_same_weights_as_a_straight_run(self):
        common = self.exact_resume_opts(seed=7, max_iter=6, checkpoint_period=3)
        straight = self.out("straight")
        proc = run_train_net(common + ["OUTPUT_DIR", straight])
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])

        resumed = self.out("resumed")
        os.makedirs(resumed)
        proc = run_train_net(common + ["OUTPUT_DIR", resumed], wait=False)
        self.kill_at_checkpoint(proc, resumed, "model_0000002.pth")
        plain = self.out("resumed_without_replay")
        shutil.copytree(resumed, plain)
        proc = run_train_net(["--resume"] + common + ["OUTPUT_DIR", resumed])
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        self.assertIn("replayed 3/3 batches", proc.stdout + proc.stderr)
        # control: detectron2's own resume (data stream and RNGs restart) does not end equal
        proc = run_train_net(
            ["--resume"] + common + ["OUTPUT_DIR", plain, "DATALOADER.EXACT_RESUME", False]
        )
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])

        final = {
            d: load_tensor_file(os.path.join(d, "model_final.pth"))
            for d in (straight, resumed, plain)
        }
        a, b, c = final[straight], final[resumed], final[plain]
        self.assertEqual(a["iteration"], b["iteration"])
        self.assertEqual(a["model"].keys(), b["model"].keys())
        different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
        self.assertEqual(different, [], f"{len(different)} tensors differ")
        opt_a, opt_b = (x["trainer"]["_trainer"]["optimizer"]["state"] for x in (a, b))
        self.assertEqual(opt_a.keys(), opt_b.keys())
        for k in opt_a:
            self.assertTrue(torch.equal(opt_a[k]["exp_avg"], opt_b[k]["exp_avg"]))
        self.assertTrue(any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"]))


@pytest.mark.slow
class TestNonFiniteLoss(TrainingTestCase):
    def test_nan_loss_stops_training_naming_iteration_and_keeps_last_checkpoint(self):
        out = self.out("nan")
        proc = run_train_net(
            self.data_opts
            + [
                "OUTPUT_DIR",
                out,
                "SOLVER.BASE_LR",
                1e12,
                "SOLVER.MAX_ITER",
                30,
                "SOLVER.CHECKPOINT_PERIOD",
                1,
                "TEST.EVAL_PERIOD",
                0,
                "DATASETS.TEST",
                "()",
            ]
        )
        self.assertNotEqual(proc.returncode, 0)
        log = proc.stdout + proc.stderr
        tail = log[-4000:]
        self.assertRegex(tail, r"Training stopped at iteration \d+", tail)
        self.assertRegex(
            tail, r"(Loss became infinite or NaN at iteration=\d+|contain Inf/NaN)", tail
        )
        self.assertFalse(os.path.exists(os.path.join(out, "model_final.pth")))
        name = _assert_checkpoints_loadable(self, out)
        self.assertIsNotNone(name)
