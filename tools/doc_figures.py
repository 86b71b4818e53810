#!/usr/bin/env python
"""The figures the READMEs quote, generated from their records (each figure lives in one record):

    python tools/doc_figures.py            # rewrite the generated blocks (README, ablation README)
    python tools/doc_figures.py --check    # exit 1 where a file differs from its records

A block sits between ``<!-- figures:NAME -->`` and ``<!-- /figures -->``; its text is
:func:`blocks`'s, computed from ``projects/cbam_ablation/results_quickstart*.json`` (the ablation's
records) and ``docs/notes/records/benchmark_doors_*.json`` (the benchmark's output). Intervals are
Student-t intervals: paired over seeds (same seed, same CPU, same threads per process), and Welch's
over the same runs unpaired, beside it; where several are read at once, also with Bonferroni's
correction for their number.
"""

import argparse
import glob
import json
import math
import os
import re
import statistics
import sys
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATION = os.path.join(ROOT, "projects", "cbam_ablation")
README = os.path.join(ROOT, "README.md")
# the files whose blocks are generated
FILES = (README, os.path.join(ABLATION, "README.md"))
BLOCK = re.compile(r"(<!-- figures:([\w-]+) -->\n)(.*?)(<!-- /figures -->)", re.S)
METRICS = (("val", "bbox_AP"), ("val", "segm_AP"), ("hard", "bbox_AP"), ("hard", "segm_AP"))


def t_cdf(x: float, df: float) -> float:
    """Student's t distribution function: 0.5 + the integral of its density from 0 to ``x``
    (Simpson's rule on 4000 intervals; the density is smooth, error far below 1e-8)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def pdf(t):
        return c * (1 + t * t / df) ** (-(df + 1) / 2)

    n, a, b = 4000, 0.0, abs(x)
    h = (b - a) / n
    s = pdf(a) + pdf(b) + sum((4 if i % 2 else 2) * pdf(a + i * h) for i in range(1, n))
    half = s * h / 3
    return 0.5 + half if x >= 0 else 0.5 - half


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with ``df`` degrees of freedom, by bisection."""
    lo, hi = 0.0, 1000.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def threads(record: dict) -> int:
    """Threads per process of a run: one where it ran side by side with another (pinned to one
    core), else the machine's two."""
    return 1 if "side by side" in (record.get("note") or "") else 2


def cpu(record: dict) -> str:
    return re.split(r", (?:torch|code) ", record.get("machine", "unknown"))[0]


def matched_pairs(row: dict, base: dict) -> Tuple[List[str], List[str]]:
    """Seeds of both rows trained on the same CPU with the same threads (kept), and the others."""
    both = sorted(set(row["seeds"]) & set(base["seeds"]))
    same = [
        s
        for s in both
        if cpu(row["seeds"][s]) == cpu(base["seeds"][s])
        and threads(row["seeds"][s]) == threads(base["seeds"][s])
    ]
    return same, [s for s in both if s not in same]


def paired(a: List[float], b: List[float], level: float) -> Tuple[float, float, float]:
    d = [x - y for x, y in zip(a, b)]
    mean = statistics.mean(d)
    half = t_quantile(1 - (1 - level) / 2, len(d) - 1) * statistics.stdev(d) / len(d) ** 0.5
    return mean, mean - half, mean + half


def welch(a: List[float], b: List[float], level: float) -> Tuple[float, float, float]:
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    mean = statistics.mean(a) - statistics.mean(b)
    half = t_quantile(1 - (1 - level) / 2, df) * math.sqrt(va + vb)
    return mean, mean - half, mean + half


def _fmt(m: Tuple[float, float, float]) -> str:
    return f"{m[0]:+.1f} [{m[1]:+.1f}, {m[2]:+.1f}]"


def comparison(records: dict, row: str, base: str) -> dict:
    """Per metric, ``row`` − ``base`` over the matched pairs: paired and Welch 95% intervals, and
    the paired one at 1 − 0.05 / (number of metrics) (Bonferroni)."""
    seeds, left_out = matched_pairs(records[row], records[base])
    out = {"seeds": seeds, "left_out": left_out, "metrics": {}}
    k = len(METRICS)
    for split, metric in METRICS:
        a = [records[row]["seeds"][s][split][metric] for s in seeds]
        b = [records[base]["seeds"][s][split][metric] for s in seeds]
        out["metrics"][f"{split} {metric.split('_')[0]}"] = {
            "paired": paired(a, b, 0.95),
            "welch": welch(a, b, 0.95),
            "paired_bonferroni": paired(a, b, 1 - 0.05 / k),
        }
    return out


def comparison_table(c: dict) -> str:
    lines = ["| AP | paired, 95% | Welch, 95% | paired, Bonferroni over 4 |", "|---|---|---|---|"]
    for name, m in c["metrics"].items():
        lines.append(
            f"| {name} | {_fmt(m['paired'])} | {_fmt(m['welch'])} | "
            f"{_fmt(m['paired_bonferroni'])} |"
        )
    return "\n".join(lines)


def _load(name: str) -> dict:
    with open(os.path.join(ABLATION, name)) as f:
        return json.load(f)


def blocks() -> Dict[str, str]:
    """{block name: its markdown}, from the records."""
    five = _load("results_quickstart.json")
    pooled_rows = _load("results_quickstart_pooled.json")
    pooled = pooled_rows["cbam_branches"]["seeds"]
    out = {}

    ap = [r["val"]["bbox_AP"] for r in pooled.values()]
    cpus = sorted({cpu(r) for r in pooled.values()})
    one_cpu = [r["val"]["bbox_AP"] for s, r in five["cbam_branches"]["seeds"].items()]
    # one seed trained on two CPU kinds ("full:<seed>": the 2026-12-02 runs)
    moved = max(
        abs(pooled[s]["val"]["bbox_AP"] - pooled["full:" + s]["val"]["bbox_AP"])
        for s in pooled
        if "full:" + s in pooled
    )
    out["quickstart-ap"] = (
        f"Expect a bbox AP on `shapes_val` near **{statistics.mean(ap):.0f}**: {len(ap)} runs of "
        f"the recipe on {len(cpus)} CPU kinds gave {min(ap):.1f}–{max(ap):.1f} (five seeds on one "
        f"CPU: {min(one_cpu):.1f}–{max(one_cpu):.1f}). A seed does not reproduce across CPU kinds "
        f"or thread counts: kernel rounding alone moved one seed by {moved:.1f} AP.\n"
    )

    cb = comparison(five, "cbam_branches", "no_cbam")
    val = cb["metrics"]["val bbox"]
    hard = cb["metrics"]["hard bbox"]
    lows = [m[k][1] for m in cb["metrics"].values() for k in ("paired", "welch")]
    highs = [m[k][2] for m in cb["metrics"].values() for k in ("paired", "welch")]
    all_zero = all(lo <= 0 <= hi for lo, hi in zip(lows, highs))
    verdict = (
        "Unknown at this scale." if all_zero else "See the table: some intervals exclude zero."
    )
    out["cbam-answer"] = (
        f"**Does CBAM help?** {verdict} CBAM on the four branches minus no CBAM, "
        f"{len(cb['seeds'])} seeds paired on one CPU kind with the same threads, 128-px shapes "
        f"trained from scratch for 1150 iterations: bbox AP on `shapes_val` "
        f"{_fmt(val['paired'])} (paired 95% interval; Welch {_fmt(val['welch'])}), on "
        f"`shapes_val_hard` {_fmt(hard['paired'])} (Welch {_fmt(hard['welch'])}). "
        f"{'Every interval holds zero; t' if all_zero else 'T'}he data rule out a gain of more "
        f"than {val['paired'][2]:+.1f} AP on "
        f"`shapes_val` and {hard['paired'][2]:+.1f} on the hard set (paired, 95%). COCO: not "
        "trained here.\n\n" + comparison_table(cb) + "\n"
    )

    ha = comparison(five, "hard_aug_p05", "cbam_branches")
    h, v = ha["metrics"]["hard bbox"], ha["metrics"]["val bbox"]
    left = ", ".join(ha["left_out"]) or "none"
    pays = h["paired"][1] > 0 and h["welch"][1] > 0
    cost_unknown = v["paired"][1] <= 0 <= v["paired"][2]
    head = "pays on hard images" if pays else "is not shown to pay on hard images"
    cost = (
        "the clean cost is within the noise, not shown to be under 1 AP"
        if cost_unknown
        else "the clean cost is outside the noise"
    )
    out["hard-aug"] = (
        f"**Training on harder images {head}.** `INPUT.HARD_AUG.ENABLED True "
        f"INPUT.HARD_AUG.PROB 0.05` minus the recipe, {len(ha['seeds'])} seeds paired on one CPU "
        f"with the same threads (seeds {left} left out: their two runs ran with different "
        "threads): "
        f"{_fmt(h['paired'])} bbox AP on `shapes_val_hard` (Welch {_fmt(h['welch'])}), for "
        f"{_fmt(v['paired'])} on `shapes_val` (Welch {_fmt(v['welch'])}); {cost}, so the "
        "quickstart trains without it.\n"
    )

    fpn = comparison(five, "cbam_fpn", "no_cbam")
    out["cbam-fpn"] = (
        f"CBAM after the FPN (`MODEL.CBAM.POSITION fpn`) minus no CBAM, the {len(fpn['seeds'])} "
        f"seeds whose two runs had the same CPU and threads (seeds "
        f"{', '.join(fpn['left_out']) or 'none'} left out: a one-thread run against a two-thread "
        "baseline). This row was singled out after looking at five rows, so its 95% intervals "
        "overstate what it shows; with Bonferroni's correction over the four metrics read:\n\n"
        + comparison_table(fpn)
        + "\n"
    )

    # the recipe's training minutes by CPU kind: runs alone on the machine (a shared run's AP
    # counts, its minutes do not)
    minutes: Dict[str, List[float]] = {}
    for row in ("cbam_branches", "no_cbam"):
        for r in pooled_rows[row]["seeds"].values():
            if threads(r) == 2 and not r.get("shared_cpu") and r.get("train_min"):
                minutes.setdefault(cpu(r), []).append(r["train_min"])
    kinds = sorted(minutes, key=lambda k: statistics.median(minutes[k]))
    quickstart_minutes = (
        "Training the quickstart model takes "
        + "; ".join(f"{statistics.median(minutes[k]):.0f} min on a {k}" for k in kinds)
        + " (median of the recipe's runs alone on the machine). "
    )
    suites = sorted(glob.glob(os.path.join(ROOT, "docs", "notes", "records", "make_test_*.json")))
    test_minutes = "`make test`'s time: not recorded yet.\n"
    if suites:
        with open(suites[-1]) as f:
            suite = json.load(f)
        test_minutes = (
            f"`make test` ran {suite['passed']} tests ({suite['skipped']} skipped) in "
            f"{suite['seconds'] / 60:.0f} min on a {suite['cpu']} ({suite['date']}).\n"
        )
    out["minutes"] = quickstart_minutes + test_minutes

    run = pooled["full:42"]  # make quickstart's own seed, its full recipe
    machine = cpu(run)
    out["model-table"] = (
        "| config | data | bbox AP | segm AP | bbox AP, hard set | weights |\n"
        "|---|---|---|---|---|---|\n"
        f"| `shapes/mask_rcnn_CBAM_HRNet_W18_FPN_shapes.yaml` (seed 42) | `shapes_val` | "
        f"{run['val']['bbox_AP']:.1f} | {run['val']['segm_AP']:.1f} | "
        f"{run['hard']['bbox_AP']:.1f} | `make quickstart` trains it ({run['train_min']:.0f} min "
        f"on a {machine.split(',')[0]}) |\n"
        "| `mask_rcnn_CBAM_HRNet_W{18,32,48}_FPN_*.yaml` | COCO | not trained here | | | "
        "ImageNet trunk: [weights](docs/weights.md) |\n"
    )

    doors = sorted(
        glob.glob(os.path.join(ROOT, "docs", "notes", "records", "benchmark_doors_20*.json"))
    )
    if doors:
        with open(doors[-1]) as f:
            rows = json.load(f)["rows"]
        ours = {k: r for k, r in rows.items() if "model_speedup_vs_R50" in r and "R_50" not in k}
        speed = [r["model_speedup_vs_R50"] for r in ours.values()]
        secs = [r["model_s"] for r in ours.values()]
        date = os.path.basename(doors[-1])[len("benchmark_doors_") : -len(".json")]
        out["speed"] = (
            f"On a 2-core CPU with native bf16 the default model runs **{min(speed):.2f}–"
            f"{max(speed):.2f}x** Detectron2's R50-FPN as shipped at 800x1216, through each of "
            f"`build_model`, `DefaultPredictor`, the trainer and LazyConfig ({min(secs):.2f}–"
            f"{max(secs):.2f} s/image; `tools/benchmark.py --doors`, "
            f"[record](docs/notes/records/benchmark_doors_{date}.md), {date}).\n"
        )
    return out


def render(text: str, generated: Dict[str, str]) -> str:
    def sub(m):
        name = m.group(2)
        if name not in generated:
            raise KeyError(f"README block figures:{name} has no generator ({sorted(generated)})")
        return m.group(1) + generated[name] + m.group(4)

    return BLOCK.sub(sub, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 where README.md differs")
    parser.add_argument("--file", nargs="*", default=list(FILES))
    args = parser.parse_args(argv)
    generated, differ = blocks(), []
    for path in args.file:
        with open(path) as f:
            text = f.read()
        new = render(text, generated)
        if new == text:
            continue
        differ.append(path)
        if not args.check:
            with open(path, "w") as f:
                f.write(new)
    if args.check and differ:
        sys.stderr.write(f"{differ}: figures differ from their records; run {__file__}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
