"""The README's figures come from their records (tools/doc_figures.py): the README as committed
equals what the generator writes from the records, a figure edited by hand fails the check, and
the intervals are Student-t intervals (the quantiles of the ablation's table, Welch's degrees of
freedom)."""

import os
import re
import shutil
import statistics
import tempfile
import unittest

from .common import REPO, load_script, load_tool

doc_figures = load_tool("doc_figures")


class TestReadmeFigures(unittest.TestCase):
    def test_the_readme_figures_equal_their_records(self):
        self.assertEqual(doc_figures.main(["--check"]), 0, "run python tools/doc_figures.py")

    def test_every_generated_block_is_in_the_readme(self):
        with open(os.path.join(REPO, "README.md")) as f:
            names = {m.group(2) for m in doc_figures.BLOCK.finditer(f.read())}
        self.assertLessEqual(names, set(doc_figures.blocks()))

    def test_a_figure_edited_by_hand_fails_the_check(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "README.md")
            shutil.copy(os.path.join(REPO, "README.md"), path)
            with open(path) as f:
                text = f.read()
            block = re.search(r"<!-- figures:cbam-answer -->\n(.*?)<!-- /figures -->", text, re.S)
            edited = block.group(1).replace("+0.3 [", "+1.3 [", 1)
            self.assertNotEqual(edited, block.group(1))
            with open(path, "w") as f:
                f.write(text.replace(block.group(1), edited))
            self.assertEqual(doc_figures.main(["--check", "--file", path]), 1)
            self.assertEqual(doc_figures.main(["--file", path]), 0)  # regenerated
            self.assertEqual(doc_figures.main(["--check", "--file", path]), 0)


class TestIntervals(unittest.TestCase):
    def test_t_quantiles_equal_the_ablation_table(self):
        table = load_script(os.path.join("projects", "cbam_ablation", "run_ablation.py")).T975
        for df, q in table.items():
            self.assertAlmostEqual(doc_figures.t_quantile(0.975, df), q, places=3)

    def test_paired_and_welch_intervals(self):
        a, b = [70.0, 71.0, 69.0, 72.0], [68.0, 70.5, 67.0, 71.0]
        mean, lo, hi = doc_figures.paired(a, b, 0.95)
        d = [x - y for x, y in zip(a, b)]
        half = 3.182 * statistics.stdev(d) / 2
        self.assertAlmostEqual(mean, statistics.mean(d))
        self.assertAlmostEqual(hi - mean, half, places=3)
        w_mean, w_lo, w_hi = doc_figures.welch(a, b, 0.95)
        self.assertAlmostEqual(w_mean, mean)
        self.assertGreater(w_hi - w_lo, 0)
        # a wider level gives a wider interval (Bonferroni over 4 intervals)
        _, b_lo, b_hi = doc_figures.paired(a, b, 1 - 0.05 / 4)
        self.assertLess(b_lo, lo)
        self.assertGreater(b_hi, hi)

    def test_pairs_are_matched_in_cpu_and_threads(self):
        side = "ran side by side with 1 other run(s), on cores [0]"
        row = {"seeds": {"1": {"machine": "X, torch 2", "note": side}, "2": {"machine": "X"}}}
        base = {
            "seeds": {
                "1": {"machine": "X, code a", "note": side},
                "2": {"machine": "X", "note": side},
            }
        }
        self.assertEqual(doc_figures.matched_pairs(row, base), (["1"], ["2"]))
