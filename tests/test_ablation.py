"""projects/cbam_ablation/run_ablation.py: the table and its reading from records on disk (the
training runs themselves are the sweep's, tens of minutes each)."""

import json
import os
import tempfile
import unittest

from .common import load_script

ablation = load_script(os.path.join("projects", "cbam_ablation", "run_ablation.py"))


def write_record(runs, row, seed, val_bbox, hard_bbox, budget="full", **extra):
    record = {
        **extra,
        "val": {"bbox_AP": val_bbox, "segm_AP": val_bbox - 1},
        "hard": {"bbox_AP": hard_bbox, "segm_AP": hard_bbox - 1},
        "infer_ms": 100.0,
        "train_min": 40.0 + seed,
    }
    path = ablation.record_path(budget, row, seed, runs)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f)


class TestAblationReport(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.runs, self.dest = os.path.join(tmp.name, "runs"), tmp.name

    def report(self, rows, seeds=(42, 1, 2)):
        md = ablation.report("full", rows, list(seeds), self.dest, runs=self.runs)
        with open(os.path.join(self.dest, "results_full.json")) as f:
            return md, json.load(f)

    def test_mean_spread_and_reading_outside_and_within_the_spread(self):
        # CBAM: val 70, 71, 72 (all below no_cbam's 73..75); hard 36, 38, 40 vs 37..39 (overlap)
        for seed, val, hard in ((42, 70, 36), (1, 71, 38), (2, 72, 40)):
            write_record(self.runs, "cbam_branches", seed, val, hard)
        for seed, val, hard in ((42, 73, 37), (1, 74, 38), (2, 75, 39)):
            write_record(self.runs, "no_cbam", seed, val, hard)
        md, data = self.report(["cbam_branches", "no_cbam"])
        mean, spread = data["cbam_branches"]["mean_spread"]["hard_bbox_AP"]
        self.assertEqual((mean, spread), (38, 2))
        self.assertEqual(data["no_cbam"]["mean_spread"]["train_min"], [55, 20.5])  # 82, 41, 42
        self.assertIn("| 71.0 ± 1.0", md)
        self.assertIn("| 41–82 ", md)  # minutes as their range
        line = next(x for x in md.splitlines() if x.startswith("- CBAM on HRNet-W18 branches"))
        self.assertIn("(3 vs 3 seeds)", line)
        self.assertIn("val bbox -3.0 (outside the spread: every seed below)", line)
        self.assertIn("hard bbox +0.0 (within the seed spread)", line)
        with open(os.path.join(self.dest, "results_full.md")) as f:
            self.assertEqual(f.read(), md + "\n")

    def test_augmentation_rows_read_against_the_seed_design_and_one_seed_gives_no_reading(self):
        write_record(self.runs, "cbam_branches", 42, 70, 36)
        write_record(self.runs, "cbam_branches", 1, 71, 37)
        write_record(self.runs, "hard_aug", 42, 65, 39)
        md, data = self.report(["cbam_branches", "no_cbam", "hard_aug"])
        self.assertEqual(sorted(data), ["cbam_branches", "hard_aug"])  # no records: no row
        lines = [x for x in md.splitlines() if x.startswith("- ") and " vs " in x]
        self.assertEqual(len(lines), 1, md)  # the seed design has no baseline records
        self.assertIn("vs CBAM on HRNet-W18 branches (seed design) (1 vs 2 seeds)", lines[0])
        self.assertIn("val bbox -5.5 (one seed, no reading)", lines[0])
        self.assertIn("hard bbox +2.5 (one seed, no reading)", lines[0])

    def test_a_seed_outside_the_asked_seeds_is_left_out(self):
        write_record(self.runs, "no_cbam", 42, 70, 30)
        write_record(self.runs, "no_cbam", 7, 10, 3)
        _, data = self.report(["no_cbam"], seeds=(42,))
        self.assertEqual(data["no_cbam"]["mean_spread"]["val_bbox_AP"], [70, 0])

    def test_a_run_on_a_shared_cpu_counts_for_ap_not_for_minutes(self):
        write_record(self.runs, "no_cbam", 42, 70, 30, shared_cpu=True)  # 82 min, left out
        write_record(self.runs, "no_cbam", 1, 72, 32)
        write_record(self.runs, "cbam_branches", 42, 71, 31, shared_cpu=True)
        md, data = self.report(["no_cbam", "cbam_branches"], seeds=(42, 1))
        self.assertEqual(data["no_cbam"]["mean_spread"]["val_bbox_AP"], [71, 1])
        self.assertEqual(data["no_cbam"]["mean_spread"]["train_min"], [41, 0])
        self.assertNotIn("train_min", data["cbam_branches"]["mean_spread"])
        self.assertIn("| 41 (1 on a shared CPU left out) ", md)
        self.assertIn("| shared CPU ", md)

    def test_machine_names_cores_isa_torch_and_commit(self):
        text = ablation.machine()
        self.assertRegex(
            text,
            r"^\d+-core .+ \((AVX|DEFAULT|ZVECTOR|NO AVX|VSX|SVE).*, (no )?native bf16\), "
            r"torch 2\.",
        )
        self.assertRegex(text, r"code ([0-9a-f]{7,}|unknown)")


class TestPairedReading(unittest.TestCase):
    def test_the_paired_difference_has_a_t_interval_and_says_what_it_shows(self):
        a = {42: 71.0, 1: 72.0, 2: 73.0, 3: 72.0, 4: 72.0}
        b = {42: 70.0, 1: 70.0, 2: 70.0, 3: 70.0, 4: 70.0, 5: 60.0}  # seed 5 has no pair
        seeds, mean, half = ablation.paired_interval(a, b)
        self.assertEqual(seeds, [1, 2, 3, 4, 42])
        self.assertAlmostEqual(mean, 2.0)
        # t(0.975, 4) = 2.776, sd of (1, 2, 3, 2, 2) = sqrt(0.5)
        self.assertAlmostEqual(half, 2.776 * 0.5**0.5 / 5**0.5, places=6)
        self.assertEqual(ablation.paired_interval({1: 3.0}, {1: 1.0}), ([1], 2.0, None))

    def test_the_report_reads_each_row_against_its_baseline_with_val1k(self):
        with tempfile.TemporaryDirectory() as d:
            runs = os.path.join(d, "runs")
            for seed, (cbam, plain) in {1: (70, 71), 2: (69, 72), 3: (71, 71)}.items():
                write_record(
                    runs, "cbam_branches", seed, cbam, 30, val1k={"bbox_AP": cbam, "segm_AP": 60}
                )
                write_record(
                    runs, "no_cbam", seed, plain, 30, val1k={"bbox_AP": plain, "segm_AP": 60}
                )
            md = ablation.report("full", ["cbam_branches", "no_cbam"], [1, 2, 3], d, runs=runs)
        line = next(
            x
            for x in md.splitlines()
            if x.startswith("- CBAM on HRNet-W18 branches (seed design) −")
        )
        self.assertIn("3 paired seeds", line)
        # differences -1, -3, 0: mean -1.3, interval contains 0
        self.assertRegex(line, r"val bbox -1\.3 \[-5\.\d, \+2\.\d\] \(contains 0: unknown\)")
        self.assertIn("val1k bbox -1.3", line)
        self.assertIn("hard bbox +0.0", line)

    def test_runs_of_one_seed_on_different_cpus_are_not_paired(self):
        amx = "2-core Intel(R) Xeon(R) Processor (AVX512, native bf16), torch 2.14.1, code abc"
        avx2 = "2-core AMD EPYC 7763 (AVX2, no native bf16), torch 2.14.1, code def"
        with tempfile.TemporaryDirectory() as d:
            runs = os.path.join(d, "runs")
            for seed, cbam, plain, cpu in ((1, 70, 71, amx), (2, 69, 72, amx), (3, 71, 75, amx)):
                write_record(runs, "cbam_branches", seed, cbam, 30, machine=cpu)
                # seed 3's "no CBAM" run was made on another day's CPU: -4 would be the CPU's
                write_record(runs, "no_cbam", seed, plain, 30, machine=avx2 if seed == 3 else cpu)
            md = ablation.report("full", ["cbam_branches", "no_cbam"], [1, 2, 3], d, runs=runs)
        line = next(
            x
            for x in md.splitlines()
            if x.startswith("- CBAM on HRNet-W18 branches (seed design) −")
        )
        self.assertIn("2 paired seeds", line)
        self.assertIn("val bbox -2.0 [", line)  # (-1, -3), not (-1, -3, -4)
        self.assertIn("seed(s) 3 left out: the two runs were trained on different CPUs", line)
        self.assertEqual(ablation.cpu_of({"machine": amx}), amx.split(", torch")[0])
        # the oldest records wrote the machine by hand: "CPU, code X; note"
        hand = "2-core AMD EPYC with AVX512-BF16, code d9a71d2; the first ~10 minutes shared"
        self.assertEqual(ablation.cpu_of({"machine": hand}), "2-core AMD EPYC with AVX512-BF16")

    def test_budgets_of_the_same_recipe_pool_their_pairs(self):
        with tempfile.TemporaryDirectory() as d:
            runs = os.path.join(d, "runs")
            for seed, cbam, plain in ((42, 70, 71), (1, 69, 72)):  # budget full
                write_record(runs, "cbam_branches", seed, cbam, 30)
                write_record(runs, "no_cbam", seed, plain, 30)
            for seed, cbam, plain in ((42, 66, 70), (2, 67, 72)):  # another day, its own budget
                write_record(runs, "cbam_branches", seed, cbam, 30, budget="quickstart")
                write_record(runs, "no_cbam", seed, plain, 30, budget="quickstart")
            rows = ["cbam_branches", "no_cbam"]
            md = ablation.report("quickstart", rows, [42, 2], d, runs=runs, pool=("full",))
            self.assertTrue(os.path.isfile(os.path.join(d, "results_quickstart_pooled.md")))
            self.assertFalse(os.path.exists(os.path.join(d, "results_quickstart.md")))
        self.assertIn("Runs of budget quickstart and of full (same recipe), pooled", md)
        self.assertIn("42: 66.0/30.0, 2: 67.0/30.0, full:42: 70.0/30.0, full:1: 69.0/30.0", md)
        line = next(
            x
            for x in md.splitlines()
            if x.startswith("- CBAM on HRNet-W18 branches (seed design) −")
        )
        self.assertIn("4 paired seeds", line)
        self.assertIn("val bbox -3.2 [", line)  # (-4, -5, -1, -3)


class TestEmaReading(unittest.TestCase):
    def test_the_average_is_read_against_the_raw_weights_of_the_same_runs(self):
        with tempfile.TemporaryDirectory() as d:
            runs = os.path.join(d, "runs")
            for seed, gain in ((1, 1.0), (2, 2.0)):
                raw = {"val": {"bbox_AP": 60.0, "segm_AP": 59.0}}
                write_record(runs, "cbam_branches", seed, 60 + gain, 30, raw=raw)
            md = ablation.report("full", ["cbam_branches"], [1, 2], d, runs=runs)
        line = next(x for x in md.splitlines() if "averaged − raw weights" in x)
        self.assertIn("2 run(s)", line)
        # bbox gains 1 and 2: mean 1.5, t(0.975, 1) = 12.706 x 0.7071 / 1.414 = 6.35
        self.assertIn("val bbox +1.50 [-4.9, +7.9]", line)
        self.assertIn("val segm +1.50", line)  # write_record: segm = bbox - 1, raw segm 59


spread = load_script(os.path.join("projects", "cbam_ablation", "spread.py"))


class TestSpreadCurves(unittest.TestCase):
    def test_loss_curve_finds_the_largest_rise_and_the_table_puts_runs_side_by_side(self):
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "metrics.json"), "w") as f:
                for it, loss in ((19, 2.0), (39, 1.5), (59, 1.9), (79, 1.0)):
                    f.write(json.dumps({"iteration": it, "total_loss": loss}) + "\n")
                f.write(json.dumps({"iteration": 79, "bbox/AP": 5.0}) + "\n")  # no loss: skipped
            losses = spread.loss_curve(d)
            self.assertEqual(losses["largest_rises"][0], [59, 0.4])
            for name, aps in (("worst", (10.0, 50.0)), ("best", (12.0, 70.0))):
                points = [
                    {"checkpoint": "0000039", "bbox_AP": aps[0], "segm_AP": 0},
                    {"checkpoint": "final", "bbox_AP": aps[1], "segm_AP": 0},
                ]
                with open(os.path.join(d, f"{name}_curve.json"), "w") as f:
                    json.dump({"ap": points, **losses}, f)
            table = spread.side_by_side(["worst", "best"], out=d).splitlines()
            self.assertIn("worst bbox AP", table[0])
            self.assertRegex(table[2], r"\| 0000039 +\| 10\.0 +\| 1\.500 +\| 12\.0 ")
            self.assertRegex(table[3], r"\| final +\| 50\.0 +\| 1\.000 +\| 70\.0 ")  # final last
            with self.assertRaisesRegex(FileNotFoundError, "spread.py curve RUN_DIR --name gone"):
                spread.side_by_side(["gone"], out=d)


class TestRunsSideBySide(unittest.TestCase):
    def test_cores_split_into_equal_groups_and_too_many_runs_are_refused(self):
        self.assertEqual(
            ablation.core_groups(list(range(16)), 6),
            [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]],
        )
        self.assertEqual(ablation.core_groups([0, 1], 1), [[0, 1]])
        with self.assertRaisesRegex(ValueError, "at most 2 runs side by side; lower --parallel"):
            ablation.core_groups([0, 1], 3)

    @unittest.skipUnless(hasattr(os, "sched_setaffinity"), "no CPU affinity on this OS")
    def test_a_pinned_command_sees_only_its_cores(self):
        import subprocess
        import sys

        core = min(os.sched_getaffinity(0))
        probe = [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]
        cmd = [sys.executable, "-c", ablation._PINNED, json.dumps([core]), *probe]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        self.assertEqual(out.strip(), f"[{core}]")

    @unittest.skipUnless(hasattr(os, "sched_getaffinity"), "no CPU affinity on this OS")
    def test_runs_side_by_side_each_get_their_own_cores_and_say_so(self):
        import threading
        import time
        from unittest import mock

        if len(os.sched_getaffinity(0)) < 2:
            self.skipTest("one core: nothing to place side by side")
        calls, running, peak, lock = [], [0], [0], threading.Lock()

        def fake_run_one(budget, row, seed, out, cores=None, beside=0):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.2)
            with lock:
                running[0] -= 1
                calls.append((row, seed, tuple(cores or ()), beside))

        reports = []
        todo = [("cbam_branches", 1), ("no_cbam", 1), ("cbam_branches", 2), ("no_cbam", 2)]
        with mock.patch.object(ablation, "run_one", fake_run_one):
            ablation.run_all("quickstart", todo, "/nonexistent", 2, lambda: reports.append(1))
        self.assertEqual(peak[0], 2)  # two at a time
        self.assertEqual(sorted((r, s) for r, s, _, _ in calls), sorted(todo))
        groups = {c for _, _, c, _ in calls}
        self.assertEqual(len(groups), 2)  # two disjoint groups of cores, reused
        self.assertFalse(set(groups.pop()) & set(groups.pop()))
        self.assertTrue(all(beside == 1 for *_, beside in calls))
        self.assertEqual(len(reports), 4)  # the table rewritten after each run
        calls.clear()
        with mock.patch.object(ablation, "run_one", fake_run_one):
            with mock.patch.object(ablation, "core_groups", side_effect=AssertionError):
                ablation.run_all("quickstart", todo[:1], "/nonexistent", 1, lambda: None)
        self.assertEqual(calls, [("cbam_branches", 1, (), 0)])  # alone: every core, not pinned


class TestMachine(unittest.TestCase):
    def test_the_code_is_changed_by_code_edits_not_by_the_sweeps_own_outputs(self):
        with tempfile.TemporaryDirectory() as repo:
            here = os.path.join(repo, "projects", "cbam_ablation")
            os.makedirs(os.path.join(here, "runs"))
            files = ["run_ablation.py", "results_quickstart.md", os.path.join("runs", "s.json")]
            for name in files:
                with open(os.path.join(here, name), "w") as f:
                    f.write("a\n")
            git = ["git", "-C", repo, "-c", "user.name=t", "-c", "user.email=t@t"]
            for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "x"]):
                ablation.subprocess.run([*git, *args], check=True)
            old = ablation.REPO, ablation.HERE
            ablation.REPO, ablation.HERE = repo, here
            try:
                states = []
                for name in reversed(files):  # the outputs first, then the code
                    with open(os.path.join(here, name), "a") as f:
                        f.write("b\n")
                    states.append(ablation.machine().endswith("+changes"))
            finally:
                ablation.REPO, ablation.HERE = old
        self.assertEqual(states, [False, False, True])
