"""Cluster runs against a real scheduler: a single-node SLURM that this suite starts
(tools/slurm/start_local_slurm.sh: Debian's slurmctld, slurmd and munge on 127.0.0.1) and
torchrun. ``srun`` (2 tasks) and ``torchrun`` (2 processes) run train_net.py as it is, each
process one rank (no extra processes), and end with the same weights as ``--num-gpus 2``; an
``sbatch`` job warned with SIGUSR1 writes a checkpoint, has itself requeued, and the requeued job
(same id, restart count 1) resumes by itself and ends with the weights of a run never stopped."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
from unittest import mock

import pytest
import torch

from cbam_hrnet_d2.engine.scheduler import expand_slurm_nodelist, ranks_from_environment

from .test_preemption import final_weights
from .test_training import CONFIG, TrainingTestCase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_SLURM = os.path.join(REPO, "tools", "slurm", "start_local_slurm.sh")
ITERS = 30  # detectron2 logs every 20 iterations: the warning lands after iteration 19


def start_slurm():
    """'' where a local SLURM runs (started here if need be), else why not."""
    if os.geteuid() != 0 and not shutil.which("sinfo"):
        return "a local SLURM needs root to install and start"
    proc = subprocess.run(["bash", START_SLURM], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return f"tools/slurm/start_local_slurm.sh failed: {proc.stderr[-500:]}"
    return ""


def same_weights(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


class TestRanksFromTheEnvironment(unittest.TestCase):
    def test_srun_task_torchrun_process_and_batch_shell(self):
        srun = {
            "SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3",
            "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2", "SLURM_LOCALID": "1",
            "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
            "SLURM_STEP_NODELIST": "gpu[07-08]",
        }  # fmt: skip
        r = ranks_from_environment(srun)
        self.assertEqual(
            (r.source, r.rank, r.world_size, r.local_rank, r.local_world_size, r.node_rank),
            ("SLURM", 3, 4, 1, 2, 1),
        )
        self.assertEqual((r.master_addr, r.master_port), ("gpu07", 15042))
        torchrun = {
            "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "GROUP_RANK": "0",
        }  # fmt: skip
        r = ranks_from_environment({**srun, **torchrun})  # torchrun inside srun: torchrun's
        self.assertEqual((r.source, r.rank, r.world_size, r.master_port), ("torchrun", 1, 2, 29500))
        # the batch shell of an sbatch job is no task of a step; one task is no multi-process run
        batch = {k: v for k, v in srun.items() if k != "SLURM_STEP_ID"}
        self.assertIsNone(ranks_from_environment(batch))
        one = {"SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_NUM_NODES": "1"}
        one.update(SLURM_STEP_TASKS_PER_NODE="1", SLURM_PROCID="0", SLURM_NODEID="0")
        self.assertIsNone(ranks_from_environment({**srun, **one}))

    def test_uneven_tasks_per_node_are_refused_naming_the_flag(self):
        env = {
            "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "3",
            "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_TASKS_PER_NODE": "2,1",
            "SLURM_STEP_NODELIST": "a,b",
        }  # fmt: skip
        with self.assertRaisesRegex(ValueError, "--ntasks-per-node"):
            ranks_from_environment(env)

    def test_nodelists_expand_without_scontrol(self):
        with mock.patch.dict(os.environ, {"PATH": "/nonexistent"}):  # no scontrol
            hosts = expand_slurm_nodelist("gpu[01-03,07],cpu5")
        self.assertEqual(hosts, ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"])


@pytest.mark.slow
class TestClusterRuns(TrainingTestCase):
    """Each run: 2 CPU processes over gloo, 30 iterations of batch 4, exact resume on."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.opts = TrainingTestCase.exact_resume_opts(
            cls, seed=5, max_iter=ITERS, checkpoint_period=1000
        )
        cls.opts += ["SOLVER.IMS_PER_BATCH", 4, "MODEL.DEVICE", "cpu"]
        cls.opts = [str(o) for o in cls.opts]
        cls.work = tempfile.TemporaryDirectory(dir="/tmp")  # on a path every task sees
        cls.reference = os.path.join(cls.work.name, "spawned")
        cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--num-gpus", "2"]
        cmd += ["--config-file", CONFIG, *cls.opts, "OUTPUT_DIR", cls.reference]
        cls.spawned = cls.run_cmd(cmd)

    @classmethod
    def tearDownClass(cls):
        cls.work.cleanup()
        super().tearDownClass()

    @staticmethod
    def run_cmd(cmd, timeout=600):
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        return subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )

    def train_args(self):
        return [os.path.join(REPO, "train_net.py"), "--config-file", CONFIG, *self.opts]

    def assert_ranks_and_weights(self, proc, out, source):
        log = proc.stdout + proc.stderr
        self.assertEqual(proc.returncode, 0, log[-4000:])
        self.check(self.spawned)
        for rank in (0, 1):
            self.assertIn(f"Ranks from {source}: rank {rank} of 2", log)
        self.assertNotIn("Ranks from", self.spawned.stdout + self.spawned.stderr)
        self.assertTrue(same_weights(final_weights(out), final_weights(self.reference)))

    def test_torchrun_runs_train_net_as_it_is(self):
        out = os.path.join(self.work.name, "torchrun")
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        cmd = [torchrun, "--standalone", "--nproc-per-node=2", *self.train_args()]
        self.assert_ranks_and_weights(self.run_cmd(cmd + ["OUTPUT_DIR", out]), out, "torchrun")

    def test_srun_runs_train_net_as_it_is(self):
        why = start_slurm()
        if why:
            self.skipTest(why)
        out = os.path.join(self.work.name, "srun")
        cmd = ["srun", "--ntasks=2", "--cpus-per-task=1", sys.executable, *self.train_args()]
        self.assert_ranks_and_weights(self.run_cmd(cmd + ["OUTPUT_DIR", out]), out, "SLURM")

    def test_a_warned_sbatch_job_requeues_itself_and_resumes_exactly(self):
        why = start_slurm()
        if why:
            self.skipTest(why)
        out = os.path.join(self.work.name, "requeued")
        os.makedirs(out)
        slurm_log = os.path.join(out, "slurm.out")
        train = self.train_args()
        args = shlex.join([sys.executable, train[0], "--resume", *train[1:]])
        script = os.path.join(out, "job.sh")
        with open(script, "w") as f:  # docs/cluster.md's script, on 2 CPU tasks
            f.write(
                "#!/bin/bash\n#SBATCH --ntasks=2\n#SBATCH --cpus-per-task=1\n#SBATCH --requeue\n"
                f"#SBATCH --open-mode=append\n#SBATCH --output={slurm_log}\n"
                'echo "job start restart=${SLURM_RESTART_COUNT:-0}"\n'
                f"export PYTHONWARNINGS=ignore\nsrun {args} OUTPUT_DIR {shlex.quote(out)}\n"
            )
        job = subprocess.run(
            ["sbatch", "--parsable", script], capture_output=True, text=True, check=True
        ).stdout.strip()
        self.addCleanup(subprocess.run, ["scancel", job], capture_output=True)
        log = os.path.join(out, "log.txt")
        deadline = time.time() + 300
        while time.time() < deadline:
            if os.path.isfile(log) and "iter: 19" in open(log).read():
                break
            time.sleep(0.5)
        else:
            self.fail("the job logged no iteration 19:\n" + open(slurm_log).read()[-3000:])
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
        states = []
        while time.time() < deadline + 300:
            show = subprocess.run(
                ["scontrol", "show", "job", "-o", job], capture_output=True, text=True
            )
            state = re.search(r"JobState=(\w+)", show.stdout).group(1)
            restarts = int(re.search(r"Restarts=(\d+)", show.stdout).group(1))
            if not states or states[-1] != (state, restarts):
                states.append((state, restarts))
            if state == "PENDING" and restarts:
                # SLURM holds a requeued job for a while before it is eligible (its BeginTime);
                # the suite does not wait for it
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
                break
            time.sleep(1)
        with open(slurm_log) as f:
            text = f.read()
        self.assertEqual(states[-1], ("COMPLETED", 1), (states, text[-3000:]))
        self.assertIn("job start restart=0", text)
        self.assertIn("job start restart=1", text)
        self.assertIn(f"SLURM job {job} requeued", text)
        stopped = int(re.search(r"Stopped by SIGUSR1 after iteration (\d+)", text).group(1))
        self.assertIn(f"Starting training from iteration {stopped + 1}", text)
        self.assertIn(f"replayed {stopped + 1}/{stopped + 1} batches", text)
        self.check(self.spawned)
        self.assertTrue(same_weights(final_weights(out), final_weights(self.reference)))
