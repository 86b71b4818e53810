"""The engine pieces a cluster run meets, in-process: one run per output folder (the lock), the
launcher's device checks, the per-iteration stop agreement, and RNG states that resume on fewer
GPUs."""

import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import unittest
from unittest import mock

import torch

from cbam_hrnet_d2.engine import preemption, resume
from cbam_hrnet_d2.engine.lock import LOCK_FILE, OutputDirBusy, claim_output_dir, read_lock

# the module: cbam_hrnet_d2.engine exports its function launch under the same name (as detectron2)
launch_module = importlib.import_module("cbam_hrnet_d2.engine.launch")


def _write_lock(folder, **holder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, LOCK_FILE), "w") as f:
        json.dump({"started": 0, "command": "python train_net.py", **holder}, f)


class TestOutputDirLock(unittest.TestCase):
    def setUp(self):
        self.dir = self.enterContext(tempfile.TemporaryDirectory())
        self.out = os.path.join(self.dir, "run")

    def test_the_holder_is_written_and_removed_at_the_end(self):
        with claim_output_dir(self.out) as got:
            self.assertEqual(got, self.out)
            holder = read_lock(self.out)
            self.assertEqual((holder["host"], holder["pid"]), (socket.gethostname(), os.getpid()))
            self.assertIn("command", holder)
        self.assertIsNone(read_lock(self.out))

    def test_the_lock_is_removed_when_the_run_fails(self):
        with self.assertRaises(RuntimeError):
            with claim_output_dir(self.out):
                raise RuntimeError("training crashed")
        self.assertIsNone(read_lock(self.out))

    def test_a_second_training_run_into_a_live_runs_folder_is_refused_naming_the_holder(self):
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.addCleanup(sleeper.kill)
        _write_lock(self.out, host=socket.gethostname(), pid=sleeper.pid)
        with self.assertRaises(OutputDirBusy) as ctx:
            with claim_output_dir(self.out):
                self.fail("entered a folder another run holds")
        text = str(ctx.exception)
        for part in (
            self.out,
            f"process {sleeper.pid}",
            socket.gethostname(),
            "another OUTPUT_DIR",
        ):
            self.assertIn(part, text)
        self.assertEqual(read_lock(self.out)["pid"], sleeper.pid)  # the holder's lock stays

    def test_eval_only_into_a_busy_folder_gets_its_own_subfolder(self):
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.addCleanup(sleeper.kill)
        _write_lock(self.out, host=socket.gethostname(), pid=sleeper.pid)
        with self.assertLogs("cbam_hrnet_d2.engine.lock", "WARNING") as logs:
            with claim_output_dir(self.out, eval_only=True) as got:
                self.assertEqual(os.path.dirname(got), self.out)
                self.assertTrue(os.path.isdir(got))
        self.assertIn(got, logs.output[0])
        self.assertEqual(read_lock(self.out)["pid"], sleeper.pid)

    def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(self):
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        _write_lock(self.out, host=socket.gethostname(), pid=dead.pid)
        with self.assertLogs("cbam_hrnet_d2.engine.lock", "WARNING") as logs:
            with claim_output_dir(self.out) as got:
                self.assertEqual(got, self.out)
                self.assertEqual(read_lock(self.out)["pid"], os.getpid())
        self.assertIn("its holder is gone", logs.output[0])
        self.assertIn(f"process {dead.pid}", logs.output[0])

    def test_a_renewed_lock_from_another_host_is_refused_naming_it_and_the_lease(self):
        _write_lock(self.out, host="node-17.cluster", pid=1234)  # renewed just now
        with self.assertRaises(OutputDirBusy) as ctx:
            with claim_output_dir(self.out):
                pass
        text = str(ctx.exception)
        self.assertIn("node-17.cluster", text)
        self.assertRegex(text, r"renewed its lock [01] s ago")
        self.assertIn("taken over once it is 180 s old (CBAM_HRNET.RUN_LOCK.LEASE_SECONDS)", text)
        self.assertIn(f"delete {os.path.join(self.out, LOCK_FILE)}", text)

    def test_a_lock_of_another_host_not_renewed_for_two_hours_is_taken_over(self):
        # a job killed by SIGKILL on node-17 and requeued here: its lease ran out long ago
        _write_lock(self.out, host="node-17.cluster", pid=1234)
        path = os.path.join(self.out, LOCK_FILE)
        two_hours_ago = time.time() - 2 * 3600
        os.utime(path, (two_hours_ago, two_hours_ago))
        with self.assertLogs("cbam_hrnet_d2.engine.lock", "WARNING") as logs:
            with claim_output_dir(self.out) as got:
                self.assertEqual(got, self.out)
                self.assertEqual(read_lock(self.out)["host"], socket.gethostname())
        self.assertIn("not renewed for 7200 s, longer than its lease of 180 s", logs.output[0])
        self.assertIn("node-17.cluster", logs.output[0])

    def test_the_holder_renews_its_lock_while_it_runs(self):
        path = os.path.join(self.out, LOCK_FILE)
        with claim_output_dir(self.out, lease_s=0.3):
            os.utime(path, (0, 0))  # as if last renewed in 1970
            time.sleep(0.5)  # the renewer touches it every 0.1 s
            self.assertLess(time.time() - os.stat(path).st_mtime, 0.3)
        with self.assertRaisesRegex(
            ValueError, "CBAM_HRNET.RUN_LOCK.LEASE_SECONDS = 0 must be > 0"
        ):
            with claim_output_dir(self.out, lease_s=0):
                pass


class TestLaunchChecks(unittest.TestCase):
    def test_more_gpus_than_visible_names_the_flag_and_the_cpu_alternative(self):
        with mock.patch.object(torch.cuda, "device_count", lambda: 1):
            with self.assertRaisesRegex(
                ValueError, r"--num-gpus 2 .* 1 visible GPU.*MODEL.DEVICE cpu"
            ):
                launch_module.check_num_gpus(2, "cuda")
            launch_module.check_num_gpus(1, "cuda")
            launch_module.check_num_gpus(8, "cpu")  # CPU processes: any number


class _Trainer:
    iter = 0


class TestStopAgreement(unittest.TestCase):
    def test_one_answer_per_iteration_from_one_process(self):
        hook = preemption.Preemption()
        hook.trainer = _Trainer()
        self.assertFalse(hook.stop_requested())
        hook._on_signal(15, None)
        self.assertEqual(hook.received, 15)
        self.assertFalse(hook.stop_requested())  # kept for the iteration
        hook.trainer.iter = 1
        self.assertTrue(hook.stop_requested())

    def test_each_hook_owns_its_state(self):
        a, b = preemption.Preemption(), preemption.Preemption()
        a.trainer = b.trainer = _Trainer()
        a._on_signal(15, None)
        self.assertTrue(a.stop_requested())
        self.assertFalse(b.stop_requested())


class TestRNGStates(unittest.TestCase):
    def test_cpu_states_round_trip_and_load_without_running_code(self):
        state = resume.capture_rng_state()
        expected = torch.rand(3)
        with tempfile.NamedTemporaryFile(suffix=".pth") as f:
            torch.save(state, f.name)
            loaded = torch.load(f.name, weights_only=True)
        resume.restore_rng_state(loaded)
        self.assertTrue(torch.equal(torch.rand(3), expected))

    def test_a_cuda_state_on_a_machine_without_cuda_is_skipped_with_a_warning(self):
        if torch.cuda.is_available():
            self.skipTest("tests the CPU-only case")
        for saved in (torch.zeros(16, dtype=torch.uint8), [torch.zeros(16, dtype=torch.uint8)] * 2):
            with self.subTest(form=type(saved).__name__):
                state = {**resume.capture_rng_state(), "cuda": saved}
                with self.assertLogs("cbam_hrnet_d2.engine.resume", "WARNING") as logs:
                    resume.restore_rng_state(state)
                self.assertIn("no GPU", logs.output[0])


if __name__ == "__main__":
    unittest.main()


class TestDeviceRules(unittest.TestCase):
    def test_threads_are_shared_between_local_processes_on_either_device(self):
        from cbam_hrnet_d2.cpu.process import set_cpu_threads
        from cbam_hrnet_d2.device import cpu_threads_per_process

        self.assertEqual(cpu_threads_per_process(8, cores=16), 2)
        self.assertEqual(cpu_threads_per_process(8, cores=4), 1)  # at least one
        before = torch.get_num_threads()
        self.addCleanup(torch.set_num_threads, before)
        with mock.patch("detectron2.utils.comm.get_local_size", lambda: 2):
            with mock.patch("cbam_hrnet_d2.device.available_cores", lambda: 16):
                self.assertEqual(set_cpu_threads("cuda"), 8)  # 8 GPU processes: not 8 x 16
                self.assertEqual(torch.get_num_threads(), 8)

    @unittest.skipUnless(hasattr(os, "sched_setaffinity"), "no CPU affinity on this OS")
    def test_a_process_pinned_to_one_core_takes_one_thread(self):
        from cbam_hrnet_d2.device import available_cores, cpu_threads_per_process

        before = os.sched_getaffinity(0)
        self.addCleanup(os.sched_setaffinity, 0, before)
        os.sched_setaffinity(0, {min(before)})  # what taskset / a cpuset / --parallel does
        self.assertEqual(available_cores(), 1)
        self.assertEqual(cpu_threads_per_process(1), 1)

    def test_syncbn_and_ddp_device_ids_follow_the_device(self):
        from cbam_hrnet_d2.device import ddp_device_ids, trunk_norm

        self.assertEqual(trunk_norm("SyncBN", "cpu"), "naiveSyncBN")
        self.assertEqual(trunk_norm("SyncBN", "cuda:0"), "SyncBN")
        self.assertEqual(trunk_norm("GN", "cpu"), "GN")
        self.assertIsNone(ddp_device_ids(torch.nn.Linear(1, 1), 3))  # gloo: no device ids
