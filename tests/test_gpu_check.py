"""tools/gpu_check.sh, the GPU's one try: --fetch makes exactly the expected wheel set; the dry run
installs those wheels into a site of their own and imports the carried packages from it, runs every
step's plumbing in its CPU-sized form and writes the JSON the GPU run writes, each step recorded as
it ends, the limits plus their kill graces within the call; a wrong wheel set, a failed import and a
step killed at its limit stop or are noted; gpu_timing.py keeps the rows it finished."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import pytest

from .common import REPO

STEPS = ["install", "imports", "data", "cuda_tests", "timing", "quickstart", "eval_tests"]
SCRIPT = os.path.join(REPO, "tools", "gpu_check.sh")
# the device tool's most for one command; the one call must end inside it
TOOL_CALL_LIMIT_S = 600
EXPECTED_WHEELS = {
    "pycocotools", "yacs", "iopath", "omegaconf", "hydra_core", "termcolor", "fvcore",
    "antlr4_python3_runtime", "sal_detectron2",
}  # fmt: skip


def run_script(*args, env=None, timeout=900):
    full = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run(
        ["bash", SCRIPT, *args], cwd=REPO, env=full, capture_output=True, text=True, timeout=timeout
    )


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow
class TestGpuCheckDryRun(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # the wheel set, fetched as for the GPU (network), into a directory that held a stale wheel
        cls.tmp = tempfile.TemporaryDirectory()
        cls.wheels = os.path.join(cls.tmp.name, "whl")
        os.makedirs(cls.wheels)
        open(os.path.join(cls.wheels, "yacs-0.0.1-py3-none-any.whl"), "w").close()
        cls.fetch = run_script("--fetch", env={"WHEELS": cls.wheels}, timeout=600)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_fetch_makes_exactly_the_expected_set_and_drops_stale_wheels(self):
        self.assertEqual(self.fetch.returncode, 0, self.fetch.stderr[-3000:])
        names = sorted(os.listdir(self.wheels))
        self.assertEqual({n.split("-")[0] for n in names}, EXPECTED_WHEELS, names)
        self.assertEqual(len(names), len(EXPECTED_WHEELS), names)
        self.assertNotIn("yacs-0.0.1-py3-none-any.whl", names)
        pycocotools = next(n for n in names if n.startswith("pycocotools-"))
        self.assertIn("cp312", pycocotools)  # built for the GPU machine's Python

    def test_fetch_fails_on_a_failed_download(self):
        with tempfile.TemporaryDirectory() as d:
            fake = os.path.join(d, "python")
            with open(fake, "w") as f:  # pip fails: the fetch must fail, not list a partial set
                f.write("#!/bin/sh\nexit 2\n")
            os.chmod(fake, 0o755)
            proc = run_script("--fetch", env={"WHEELS": os.path.join(d, "whl"), "PYTHON": fake})
        self.assertNotEqual(proc.returncode, 0)
        self.assertNotIn("fetched", proc.stdout)

    def test_every_step_runs_from_the_carried_site_within_the_call(self):
        self.assertEqual(self.fetch.returncode, 0, self.fetch.stderr[-3000:])
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "out")
            proc = run_script("--dry-run", env={"OUT": out, "WHEELS": self.wheels})
            log = proc.stdout + proc.stderr
            self.assertEqual(proc.returncode, 0, log[-4000:])
            report = read_json(os.path.join(out, "gpu_check.json"))
            written = sorted(os.listdir(out))
        self.assertEqual(report["mode"], "dry-run")
        self.assertTrue(report["device"].startswith("cpu (dry run)"), report["device"])
        self.assertEqual([s["name"] for s in report["steps"]], STEPS)
        self.assertEqual(report["running"], "")
        self.assertEqual(sum(s["limit_s"] for s in report["steps"]), report["limits_sum_s"])
        # limits plus each step's kill grace within the budget, the budget within the call, the
        # call within the tool's limit, with room for the shell's start
        worst = report["limits_sum_s"] + len(STEPS) * report["grace_s"]
        self.assertLessEqual(worst, report["budget_s"])
        self.assertLessEqual(report["budget_s"] + 20, report["call_s"])
        self.assertLessEqual(report["call_s"], TOOL_CALL_LIMIT_S - 20)
        limits = {s["name"]: s["limit_s"] for s in report["steps"]}
        self.assertGreaterEqual(limits["imports"], 60)  # a cold torch + CUDA start on a new VM
        for s in report["steps"]:
            self.assertEqual(s["exit"], 0, (s, log[-4000:]))
            self.assertLessEqual(s["seconds"], s["limit_s"], s)
        # the carried pure-Python packages were imported from the carried site, not the venv
        self.assertRegex(log, r"from the carried site: .*detectron2.*fvcore")
        # the CUDA-only tests ran as skipped, with their reason; the timing and quickstart steps
        # left their files (at most 8 come back from the device tool)
        self.assertRegex(log, r"\d+ skipped")
        for name in ("gpu_check.log", "gpu_timing.md", "gpu_timing.json", "pytest_cuda.xml"):
            self.assertIn(name, written)
        self.assertLessEqual(len(written), 8)

    def test_two_versions_of_one_wheel_stop_the_run_before_the_install(self):
        self.assertEqual(self.fetch.returncode, 0, self.fetch.stderr[-3000:])
        with tempfile.TemporaryDirectory() as d:
            wheels = shutil.copytree(self.wheels, os.path.join(d, "whl"))
            open(os.path.join(wheels, "yacs-0.0.1-py3-none-any.whl"), "w").close()
            proc = run_script("--dry-run", env={"OUT": os.path.join(d, "out"), "WHEELS": wheels})
            report = read_json(os.path.join(d, "out", "gpu_check.json"))
        self.assertEqual(proc.returncode, 1)
        self.assertIn("holds 2 wheels of yacs", proc.stdout)
        self.assertEqual(report["steps"], [])


class TestGpuCheckStops(unittest.TestCase):
    def fake_python(self, d, body):
        fake = os.path.join(d, "python")
        with open(fake, "w") as f:
            f.write("#!/bin/sh\n" + body + "\n")
        os.chmod(fake, 0o755)
        return fake

    def test_a_failed_import_stops_the_run_and_keeps_what_finished(self):
        with tempfile.TemporaryDirectory() as d:
            fake = self.fake_python(d, "exit 3")  # every Python call fails: the imports step first
            out = os.path.join(d, "out")
            proc = run_script(
                "--dry-run", env={"OUT": out, "PYTHON": fake, "WHEELS": d + "/none"}, timeout=120
            )
            report = read_json(os.path.join(out, "gpu_check.json"))
        self.assertEqual(proc.returncode, 1)
        names = [s["name"] for s in report["steps"]]
        self.assertEqual(names, ["install", "imports"])  # install skipped: no wheels
        self.assertIn("stopping: an import failed", proc.stdout)
        self.assertEqual(report["steps"][-1]["exit"], 3)

    @pytest.mark.slow
    def test_a_step_killed_after_its_grace_is_noted_as_cut(self):
        with tempfile.TemporaryDirectory() as d:
            wheels = os.path.join(d, "whl")
            os.makedirs(wheels)
            for name in EXPECTED_WHEELS:  # a well-formed set: the install step starts
                open(os.path.join(wheels, f"{name}-1.0-py3-none-any.whl"), "w").close()
            # pip ignores SIGTERM: timeout kills it after the grace (exit 137)
            fake = self.fake_python(
                d, "case \"$*\" in *pip*) trap '' TERM; exec sleep 60 ;; *) echo 311 ;; esac"
            )
            out = os.path.join(d, "out")
            proc = run_script(
                "--dry-run", env={"OUT": out, "PYTHON": fake, "WHEELS": wheels}, timeout=120
            )
            report = read_json(os.path.join(out, "gpu_check.json"))
            with open(os.path.join(out, "gpu_check.log")) as f:
                log = f.read()
        self.assertEqual(proc.returncode, 1)
        (install,) = report["steps"]
        self.assertEqual(install["exit"], 137)
        self.assertIn("cut: killed (SIGKILL) after its limit", install["note"])
        self.assertIn("stopping: the install failed", log)
        self.assertTrue(log.rstrip().endswith("stopping: the install failed"), log[-500:])


@pytest.mark.slow
class TestGpuTimingKeepsFinishedRows(unittest.TestCase):
    def test_a_timing_run_killed_after_its_first_row_keeps_that_row(self):
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, os.path.join(REPO, "tools", "gpu_timing.py"), "--out", out]
            cmd += ["--device", "cpu", "--size", "64", "96", "--iters", "1", "--warmup", "0"]
            cmd += ["--rows", "3"]
            env = dict(os.environ, PYTHONWARNINGS="ignore")
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            path = os.path.join(out, "gpu_timing.json")
            deadline = time.time() + 300
            while not os.path.isfile(path) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)  # as a cut step after its grace
            proc.wait()
            table = read_json(path)
            with open(os.path.join(out, "gpu_timing.md")) as f:
                md = f.read()
        self.assertEqual(table["meta"]["rows_done"], "1/3")
        self.assertEqual(len(table["rows"]), 1)
        self.assertGreater(table["rows"][0]["eval_s_per_image"], 0)
        self.assertIn(table["rows"][0]["row"], md)
