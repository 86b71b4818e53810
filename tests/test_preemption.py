"""Preemption and failed checkpoint writes: SIGTERM / SIGINT to a real train_net.py
(one process and two) stops after the current step with a checkpoint and a resume line, and
``--resume`` continues exactly; a checkpoint write that fails (full disk, permission, I/O error)
leaves the previous checkpoint, ``last_checkpoint`` and no temporary file."""

import errno
import os
import re
import signal
import subprocess
import tempfile
import time
import unittest
from unittest import mock

import pytest
import torch
from torch import nn

from cbam_hrnet_d2.checkpoint.checkpointer import FileWriteError, SafeCheckpointer, load_tensor_file

from .test_training import TrainingTestCase, run_train_net

STOP_LINE = (
    r"Stopped by {sig} after iteration (\d+): checkpoint (\S+) \(last_checkpoint updated\)\. "
    r"Resume with: .*--resume"
)


# logged by MemoryMonitor after the first iteration of the loop, whose hooks (Preemption's signal
# handlers among them) were set in before_train: a signal from then on stops at a step boundary
FIRST_ITERATION = "RSS after the first iteration"


def wait_for_training(log_path, proc, timeout=300):
    """Return once train_net.py has logged its first training iteration (on a fast GPU a whole
    short run fits in a fixed delay after start-up)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(log_path) and FIRST_ITERATION in open(log_path).read():
            return
        time.sleep(0.05)
    raise AssertionError(f"training did not start: {open(log_path).read()[-3000:]}")


def final_weights(out):
    return load_tensor_file(os.path.join(out, "model_final.pth"))["model"]


class PreemptionCase(TrainingTestCase):
    def preempt(self, opts, out, sig=signal.SIGTERM, after_s=2.0, extra=(), device="cpu"):
        """Start training, send ``sig`` ``after_s`` seconds into the loop; return (returncode,
        log)."""
        os.makedirs(out, exist_ok=True)
        log_path = os.path.join(out, "stdout.log")
        proc = run_train_net(
            list(extra) + opts + ["OUTPUT_DIR", out], wait=False, log=log_path, device=device
        )
        wait_for_training(log_path, proc)
        time.sleep(after_s)
        self.assertIsNone(proc.poll(), "training ended before the signal")
        proc.send_signal(sig)
        proc.wait(timeout=300)
        return proc.returncode, open(log_path).read()

    def check_stopped(self, rc, log, out, sig):
        self.assertEqual(rc, 128 + int(sig), log[-3000:])
        m = re.search(STOP_LINE.format(sig=sig.name), log)
        self.assertIsNotNone(m, log[-3000:])
        it, path = int(m.group(1)), m.group(2)
        self.assertEqual(path, os.path.join(out, f"model_{it:07d}.pth"))
        self.assertEqual(
            open(os.path.join(out, "last_checkpoint")).read().strip(), os.path.basename(path)
        )
        self.assertEqual(load_tensor_file(path)["iteration"], it)
        self.assertFalse(os.path.exists(os.path.join(out, "model_final.pth")))
        self.assertEqual([f for f in os.listdir(out) if f.endswith(".incomplete")], [])
        return it


@pytest.mark.slow
class TestPreemptionOneProcess(PreemptionCase):
    def test_sigterm_checkpoints_the_current_iteration_and_resume_is_exact(self):
        common = self.exact_resume_opts(seed=7, max_iter=14, checkpoint_period=1000)
        straight = self.out("pre_straight")
        self.check(run_train_net(common + ["OUTPUT_DIR", straight]))

        out = self.out("pre_stopped")
        rc, log = self.preempt(common, out)
        it = self.check_stopped(rc, log, out, signal.SIGTERM)
        # any iteration before the last (on a loaded machine the first one may still be running)
        self.assertLess(it, 13)
        self.assertIn("Received SIGTERM: finishing the current iteration", log)

        proc = run_train_net(["--resume"] + common + ["OUTPUT_DIR", out])
        self.check(proc)
        self.assertIn(f"Starting training from iteration {it + 1}", proc.stdout + proc.stderr)
        self.assertIn(f"replayed {it + 1}/{it + 1} batches", proc.stdout + proc.stderr)
        a, b = final_weights(straight), final_weights(out)
        self.assertEqual([k for k in a if not torch.equal(a[k], b[k])], [])

    def test_sigint_stops_the_same_way_with_exit_code_130(self):
        out = self.out("pre_sigint")
        opts = self.data_opts + [
            "SOLVER.MAX_ITER",
            200,
            "SOLVER.CHECKPOINT_PERIOD",
            1000,
            "TEST.EVAL_PERIOD",
            0,
            "DATASETS.TEST",
            "()",
            "DATALOADER.NUM_WORKERS",
            2,
        ]
        rc, log = self.preempt(opts, out, sig=signal.SIGINT, after_s=1.0)
        self.check_stopped(rc, log, out, signal.SIGINT)
        self.assertNotIn("Traceback", log)


@pytest.mark.slow
class TestPreemptionTwoProcesses(PreemptionCase):
    def test_sigterm_to_launcher_stops_both_with_one_checkpoint_and_exact_resume_on_every_rank(
        self,
    ):
        common = self.exact_resume_opts(seed=5, max_iter=9, checkpoint_period=1000)
        common += ["SOLVER.IMS_PER_BATCH", 4]
        straight = self.out("pre2_straight")
        self.check(run_train_net(["--num-gpus", 2] + common + ["OUTPUT_DIR", straight]))

        out = self.out("pre2_stopped")
        rc, log = self.preempt(common, out, after_s=3.0, extra=["--num-gpus", 2])
        it = self.check_stopped(rc, log, out, signal.SIGTERM)
        self.assertEqual(
            [f for f in os.listdir(out) if f.endswith(".pth")], [f"model_{it:07d}.pth"]
        )
        rng = load_tensor_file(os.path.join(out, f"model_{it:07d}.pth"))["trainer"]["hooks"][
            "ExactResume"
        ]
        self.assertEqual(len(rng["ranks"]), 2)  # every rank's RNG state, not only rank 0's

        proc = run_train_net(["--resume", "--num-gpus", 2] + common + ["OUTPUT_DIR", out])
        self.check(proc)
        with open(os.path.join(out, "log.txt.rank1")) as f:
            self.assertIn(f"RNG states of process 1 are where iteration {it} left them", f.read())
        a, b = final_weights(straight), final_weights(out)
        self.assertEqual([k for k in a if not torch.equal(a[k], b[k])], [])


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)


class TestFailedCheckpointWrite(unittest.TestCase):
    def setUp(self):
        self.dir = self.enterContext(tempfile.TemporaryDirectory())
        self.ckpt = SafeCheckpointer(_Tiny(), save_dir=self.dir)
        self.ckpt.save("model_0000000", iteration=0)

    def assert_previous_intact(self):
        self.assertEqual(sorted(os.listdir(self.dir)), ["last_checkpoint", "model_0000000.pth"])
        self.assertEqual(
            open(os.path.join(self.dir, "last_checkpoint")).read(), "model_0000000.pth"
        )
        self.assertEqual(
            load_tensor_file(os.path.join(self.dir, "model_0000000.pth"))["iteration"], 0
        )

    def test_disk_full_mid_write_removes_the_temporary_file_and_names_path_and_reason(self):
        real_save = torch.save

        def full_disk(obj, f):
            f.write(b"x" * 4096)  # part of the file is written before the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device")

        with mock.patch.object(torch, "save", full_disk):
            with self.assertRaises(FileWriteError) as ctx:
                self.ckpt.save("model_0000001", iteration=1)
        msg = str(ctx.exception)
        self.assertIn(os.path.join(self.dir, "model_0000001.pth"), msg)
        self.assertIn("No space left on device", msg)
        self.assertIn("disk full?", msg)
        self.assert_previous_intact()
        self.assertIs(torch.save, real_save)

    def test_permission_denied_names_path_and_leaves_the_previous_checkpoint(self):
        with mock.patch(
            "cbam_hrnet_d2.utils.files.open",
            side_effect=PermissionError(errno.EACCES, "Permission denied"),
            create=True,
        ):
            with self.assertRaisesRegex(
                FileWriteError, r"model_0000001.pth: PermissionError.*Permission denied"
            ):
                self.ckpt.save("model_0000001", iteration=1)
        self.assert_previous_intact()

    def test_io_error_while_tagging_last_checkpoint_keeps_the_old_tag(self):
        with mock.patch(
            "cbam_hrnet_d2.utils.files.os.fsync",
            side_effect=[None, OSError(errno.EIO, "Input/output error")],
        ):
            with self.assertRaisesRegex(
                FileWriteError, r"last_checkpoint: OSError.*Input/output error"
            ):
                self.ckpt.save("model_0000001", iteration=1)
        # the new checkpoint file is complete, but last_checkpoint still names the previous one
        self.assertEqual(
            open(os.path.join(self.dir, "last_checkpoint")).read(), "model_0000000.pth"
        )
        self.assertEqual(
            load_tensor_file(os.path.join(self.dir, "model_0000001.pth"))["iteration"], 1
        )
        self.assertEqual([f for f in os.listdir(self.dir) if f.startswith(".")], [])


def _mount_tmpfs(path, size):
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
            check=True,
            capture_output=True,
            timeout=30,
        )
        return True
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.slow
class TestFullDisk(TrainingTestCase):
    def test_training_on_a_full_disk_stops_naming_the_checkpoint_and_leaves_the_previous_one(self):
        out = self.out("full_disk")
        os.makedirs(out)
        # one checkpoint of the instant-test model is ~150 MB: room for one, not two
        if not _mount_tmpfs(out, "230m"):
            self.skipTest(
                "needs root to mount a small tmpfs (TestFailedCheckpointWrite injects the fault "
                "instead)"
            )
        self.addCleanup(subprocess.run, ["umount", "-l", out], capture_output=True)
        proc = run_train_net(
            self.data_opts
            + [
                "OUTPUT_DIR",
                out,
                "SOLVER.CHECKPOINT_PERIOD",
                2,
                "TEST.EVAL_PERIOD",
                0,
                "DATASETS.TEST",
                "()",
            ]
        )
        self.assertNotEqual(proc.returncode, 0)
        err = proc.stderr
        self.assertIn(f"could not write {out}/model_0000003.pth", err)
        self.assertIn("disk full?", err)
        self.assertEqual([f for f in os.listdir(out) if f.endswith(".incomplete")], [])
        self.assertEqual(open(os.path.join(out, "last_checkpoint")).read(), "model_0000001.pth")
        self.assertEqual(load_tensor_file(os.path.join(out, "model_0000001.pth"))["iteration"], 1)
