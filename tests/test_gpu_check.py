"""tools/gpu_check.sh --dry-run (issue 35): the GPU script's every step runs its plumbing on this
CPU in its CPU-sized form and writes the JSON the GPU run writes, each step recorded as it ends,
the limits within the one-call budget."""

import json
import os
import subprocess
import tempfile
import unittest

import pytest

from .common import REPO

STEPS = ["install", "imports", "data", "cuda_tests", "timing", "quickstart", "eval_tests"]


@pytest.mark.slow
class TestGpuCheckDryRun(unittest.TestCase):
    def test_every_step_runs_and_is_recorded_within_the_budget(self):
        with tempfile.TemporaryDirectory() as d:
            env = dict(os.environ, OUT=os.path.join(d, "out"), PYTHONWARNINGS="ignore")
            proc = subprocess.run(
                ["bash", os.path.join(REPO, "tools", "gpu_check.sh"), "--dry-run"],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            log = proc.stdout + proc.stderr
            self.assertEqual(proc.returncode, 0, log[-4000:])
            with open(os.path.join(d, "out", "gpu_check.json")) as f:
                report = json.load(f)
            written = sorted(os.listdir(os.path.join(d, "out")))
        self.assertEqual(report["mode"], "dry-run")
        self.assertTrue(report["device"].startswith("cpu (dry run)"), report["device"])
        self.assertEqual([s["name"] for s in report["steps"]], STEPS)
        self.assertLessEqual(report["limits_sum_s"], report["budget_s"])
        self.assertEqual(report["budget_s"], 540)
        self.assertEqual(sum(s["limit_s"] for s in report["steps"]), report["limits_sum_s"])
        for s in report["steps"]:
            self.assertEqual(s["exit"], 0, (s, log[-4000:]))
            self.assertLessEqual(s["seconds"], s["limit_s"], s)
        # the CUDA-only tests ran as skipped, with their reason; the timing and quickstart steps
        # left their files (at most 8 come back from the device tool; the dry run's quickstart is
        # not evaluated)
        self.assertRegex(log, r"\d+ skipped")
        for name in ("gpu_check.log", "gpu_timing.md", "pytest_cuda.xml"):
            self.assertIn(name, written)
        self.assertLessEqual(len(written), 8)

    def test_a_failed_import_stops_the_run_and_keeps_what_finished(self):
        with tempfile.TemporaryDirectory() as d:
            fake = os.path.join(d, "python")
            with open(fake, "w") as f:  # every Python call fails: the imports step first
                f.write("#!/bin/sh\nexit 3\n")
            os.chmod(fake, 0o755)
            env = dict(os.environ, OUT=os.path.join(d, "out"), PYTHON=fake)
            proc = subprocess.run(
                ["bash", os.path.join(REPO, "tools", "gpu_check.sh"), "--dry-run"],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            with open(os.path.join(d, "out", "gpu_check.json")) as f:
                report = json.load(f)
        self.assertEqual(proc.returncode, 1)
        names = [s["name"] for s in report["steps"]]
        # the install fails first where wheels were fetched (.whl/), else the imports
        self.assertIn(names[-1], ("install", "imports"))
        self.assertRegex(proc.stdout, r"stopping: (the install|an import) failed")
        self.assertEqual(report["steps"][-1]["exit"], 3)
        self.assertNotIn("data", names)
