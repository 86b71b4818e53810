#!/usr/bin/env python
"""Run the CBAM ablation at a budget and write its table (Markdown + JSON):

    # the quickstart's full budget (1150 iterations), CBAM on the branches vs none, seeds 42 1 2
    python projects/cbam_ablation/run_ablation.py --budget full --rows cbam_branches no_cbam
    # the 2026-11-24 sweep: 400 iterations, four rows, seeds 1-2
    python projects/cbam_ablation/run_ablation.py --budget 400 --seeds 1 2
    # the table from finished runs only
    python projects/cbam_ablation/run_ablation.py --budget full --report-only
    # the quickstart recipe's five-seed table, with the 2026-12-02 runs of that recipe pooled in
    python projects/cbam_ablation/run_ablation.py --budget quickstart --report-only --pool full
    # on a bigger machine (a lent GPU with 16 cores): six runs side by side, each on its own cores
    python projects/cbam_ablation/run_ablation.py --budget quickstart --seeds 42 1 --parallel 6 \
        --rows cbam_branches no_cbam cbam_fpn

Each (row, seed) trains with ``train_net.py --resume`` into ``--out/BUDGET/ROW/seedN`` (a run
stopped part-way continues from its last checkpoint), is evaluated on
``shapes_val`` (the training run's own evaluation) and on ``shapes_val_hard`` (JPEG, blur, noise,
low contrast, texture, occluders, stretch; written by ``tools/corrupt_dataset.py`` if missing), and
leaves a record in ``runs/BUDGET/ROW/seedN.json`` here, which is committed. A run whose record
exists is skipped, so the sweep continues where it stopped, across sessions and fresh clones.
Inference ms/image is detectron2's "pure compute time" of the shapes_val evaluation (batch 1);
training minutes are the run's wall time minus that evaluation.
"""

import argparse
import json
import logging
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

from tabulate import tabulate

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
QUICKSTART = os.path.join(REPO, "configs", "shapes", "mask_rcnn_CBAM_HRNet_W18_FPN_shapes.yaml")
# config and default seeds of each budget
BUDGETS = {
    "400": (os.path.join(HERE, "configs", "Base-ablation.yaml"), [1, 2]),
    "full": (QUICKSTART, [42, 1, 2]),  # 42: the quickstart's own seed
    # the quickstart recipe again, five seeds a row, every run's curve kept (issue 36)
    "quickstart": (os.path.join(HERE, "configs", "quickstart_curve.yaml"), [42, 1, 2, 3, 4]),
    # the candidate stable recipe of issue 36 (step at 900 + EMA), five seeds a row
    "stable": (os.path.join(HERE, "configs", "stable.yaml"), [42, 1, 2, 3, 4]),
    # candidate 2: cosine schedule to zero at the quickstart's budget (configs/cosine.yaml)
    "cosine": (os.path.join(HERE, "configs", "cosine.yaml"), [2, 42, 1, 3, 4]),
    # candidate 3: 1.5x the quickstart's learning rate (configs/high_lr.yaml)
    "high_lr": (os.path.join(HERE, "configs", "high_lr.yaml"), [2, 42, 1, 3, 4]),
}
_R50 = [
    "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone", "MODEL.BACKBONE.FREEZE_AT", "0",
    "MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.NORM", "GN",
    "MODEL.RESNETS.OUT_FEATURES", "['res2', 'res3', 'res4', 'res5']",
    "MODEL.FPN.IN_FEATURES", "['res2', 'res3', 'res4', 'res5']",
]  # fmt: skip
# row -> (title, overrides of the budget's config)
ROWS = {
    "cbam_branches": ("CBAM on HRNet-W18 branches (seed design)", []),
    "cbam_fpn": ("CBAM after the FPN", ["MODEL.CBAM.POSITION", "fpn"]),
    "no_cbam": ("HRNet-W18, no CBAM", ["MODEL.CBAM.ENABLED", "False"]),
    "r50_fpn": ("Detectron2 R50-FPN", _R50),
    "hard_aug": ("CBAM on the branches + INPUT.HARD_AUG", ["INPUT.HARD_AUG.ENABLED", "True"]),
    "hard_aug_p05": (
        "CBAM on the branches + INPUT.HARD_AUG, PROB 0.05",
        ["INPUT.HARD_AUG.ENABLED", "True", "INPUT.HARD_AUG.PROB", "0.05"],
    ),
    "hard_aug_late": (
        "CBAM on the branches + INPUT.HARD_AUG from iteration 575",
        ["INPUT.HARD_AUG.ENABLED", "True", "INPUT.HARD_AUG.START_ITER", "575"],
    ),
}
# the row each row is read against in the report: no CBAM, or the seed design for its augmentations
BASELINES = {r: "cbam_branches" for r in ("hard_aug", "hard_aug_p05", "hard_aug_late")}
BASELINE = "no_cbam"
DATASETS = os.getenv("DETECTRON2_DATASETS", os.path.join(REPO, "datasets"))
HARD = os.path.join(DATASETS, "shapes_val_hard")
HARD_OPTS = [
    "DATASETS.REGISTER_COCO",
    str([["shapes_val_hard", os.path.join(HARD, "val.json"), os.path.join(HARD, "images")]]),
    "DATASETS.TEST",
    "('shapes_val_hard',)",
]
logger = logging.getLogger("cbam_ablation")


RUNS = os.path.join(HERE, "runs")
_CAPTURE = dict(capture_output=True, text=True)


def record_path(budget: str, row: str, seed: int, runs: str = RUNS) -> str:
    return os.path.join(runs, budget, row, f"seed{seed}.json")


def machine() -> str:
    """Where a record was made: cores, CPU model and ISA, the GPU if any, torch, and the code's
    commit."""
    import torch

    from cbam_hrnet_d2.device import native_bf16

    model = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        model = names[0].strip() if names else model
    git = ["git", "-C", REPO]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], **_CAPTURE)
    # the sweep's own outputs (records, result tables) are not code changes
    outputs = [f":!{os.path.relpath(os.path.join(HERE, p), REPO)}" for p in ("runs", "results_*")]
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no", "--", ".", *outputs], **_CAPTURE
    )
    # train_net.py trains on CUDA where there is a GPU: its runs pair only with runs on that GPU
    gpu = f"GPU {torch.cuda.get_device_name(0)}, " if torch.cuda.is_available() else ""
    return (
        f"{os.cpu_count()}-core {model} ({torch.backends.cpu.get_cpu_capability()}"
        f"{', native bf16' if native_bf16('cpu') else ', no native bf16'}), {gpu}"
        f"torch {torch.__version__}, "
        f"code {commit.stdout.strip() or 'unknown'}{'+changes' if dirty.stdout.strip() else ''}"
    )


# runs the command that follows it pinned to the cores given first (runs side by side)
_PINNED = (
    "import json, os, sys; os.sched_setaffinity(0, json.loads(sys.argv[1])); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def _train_net(args: List[str], log_file: str, cores: Optional[List[int]] = None) -> None:
    """``train_net.py ARGS`` with its output in ``log_file``; with ``cores``, pinned to them (its
    threads follow: cbam_hrnet_d2.device.available_cores)."""
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), *args]
    logger.info("Running %s%s", " ".join(cmd), f" on cores {cores}" if cores else "")
    if cores:
        cmd = [sys.executable, "-c", _PINNED, json.dumps(cores), *cmd]
    with open(log_file, "w") as log:
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONWARNINGS="ignore"),
        )
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}; see {log_file}")


def _seconds(text: str) -> float:
    h, m, s = text.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def _aps(results_json: str) -> Dict[str, float]:
    with open(results_json) as f:
        tasks = next(iter(json.load(f).values()))
    return {"bbox_AP": tasks["bbox"]["AP"], "segm_AP": tasks["segm"]["AP"]}


def ensure_hard_set() -> None:
    if os.path.isfile(os.path.join(HARD, "val.json")):
        return
    shapes = os.path.join(DATASETS, "shapes")
    subprocess.run([sys.executable, "-m", "cbam_hrnet_d2.data", "--splits", "val"], check=True)
    tool = os.path.join(REPO, "tools", "corrupt_dataset.py")
    json_file, images = os.path.join(shapes, "val.json"), os.path.join(shapes, "val")
    cmd = [sys.executable, tool, "--json", json_file, "--images", images, "--out", HARD]
    subprocess.run(cmd, check=True)


def _eval_only(
    config: str, rows: List[str], weights: str, out: str, opts: List[str], cores=None
) -> dict:
    """bbox / segm AP of ``weights`` (``train_net.py --eval-only`` into ``out``)."""
    _train_net(
        ["--config-file", config, "--eval-only", *rows, "MODEL.WEIGHTS", weights]
        + ["OUTPUT_DIR", out, *opts],
        os.path.join(out + "_stdout.txt"),
        cores,
    )
    return _aps(os.path.join(out, "results.json"))


def _raw_weights(out: str) -> Optional[str]:
    """Where CBAM_HRNET.EMA trained the run: its raw (not averaged) final weights, written next
    to model_final.pth (which holds the average) as model_final_raw.pth; None without it."""
    import torch

    final = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=True)
    raw = final.get("trainer", {}).get("hooks", {}).get("ModelEMA", {}).get("raw")
    if raw is None:
        return None
    path = os.path.join(out, "model_final_raw.pth")
    torch.save({"model": raw}, path)
    return path


def run_one(budget: str, row: str, seed: int, out: str, cores=None, beside: int = 0) -> dict:
    """Train, evaluate on shapes_val (in training), shapes_val_hard and shapes_val1k (and, with
    CBAM_HRNET.EMA, the raw weights on shapes_val and shapes_val1k too); return the record, which
    keeps the run's loss curve (metrics.json) beside it. ``cores``: the cores it is pinned to, where
    ``beside`` other runs share the machine (its minutes then do not count: ``shared_cpu``)."""
    os.makedirs(out, exist_ok=True)
    config = BUDGETS[budget][0]
    start = time.time()
    # evaluated in fp32 (TEST.PRECISION auto runs the heads in bf16 on a bf16 CPU since 2026-12-02,
    # ~0.1 AP off fp32): every record of the sweep, old and new, on any CPU, the same arithmetic
    rows = [*ROWS[row][1], "TEST.PRECISION", "fp32"]
    train = ["--config-file", config, *rows, "SEED", str(seed), "OUTPUT_DIR", out]
    # --resume: a run stopped part-way (a session that ended) continues from its last checkpoint
    train_log = os.path.join(out, "stdout.txt")
    _train_net(["--resume", *train, "TEST.EVAL_PERIOD", "0"], train_log, cores)
    wall = time.time() - start
    weights = os.path.join(out, "model_final.pth")
    val1k = ["DATASETS.TEST", "('shapes_val1k',)"]
    record = {
        "val": _aps(os.path.join(out, "results.json")),
        "hard": _eval_only(config, rows, weights, os.path.join(out, "hard"), HARD_OPTS, cores),
        "val1k": _eval_only(config, rows, weights, os.path.join(out, "val1k"), val1k, cores),
    }
    raw = _raw_weights(out)
    if raw:
        record["raw"] = {
            "val": _eval_only(config, rows, raw, os.path.join(out, "raw_val"), [], cores),
            "val1k": _eval_only(config, rows, raw, os.path.join(out, "raw_val1k"), val1k, cores),
        }
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read()
    total = re.findall(r"Total inference time: ([0-9:.]+)", log)[-1]
    pure = re.findall(r"Total inference pure compute time: .*?\(([0-9.]+) s / iter", log)[-1]
    record.update(
        {
            "infer_ms": float(pure) * 1000,
            "train_min": (wall - _seconds(total)) / 60,
            "finished": time.strftime("%Y-%m-%d %H:%M"),
            "command": " ".join(["python train_net.py", *train]).replace(REPO + os.sep, ""),
            "machine": machine(),
        }
    )
    if beside:
        record["shared_cpu"] = True
        record["note"] = f"ran side by side with {beside} other run(s), on cores {cores}"
    path = record_path(budget, row, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    shutil.copy(os.path.join(out, "metrics.json"), path[: -len(".json")] + ".metrics.json")
    return record


METRICS = {
    "val_bbox_AP": "val bbox",
    "val_segm_AP": "val segm",
    "hard_bbox_AP": "hard bbox",
    "hard_segm_AP": "hard segm",
}
# the paired reading also takes shapes_val1k where the records have it (budgets from 2026-12-05)
PAIRED_METRICS = {**METRICS, "val1k_bbox_AP": "val1k bbox", "val1k_segm_AP": "val1k segm"}
# two-sided 95% quantiles of Student's t by degrees of freedom (n seeds - 1)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired_interval(a: Dict[int, float], b: Dict[int, float]):
    """The paired difference ``a - b`` over the seeds both have: (seeds, mean, half-width of its
    95% t interval), the half-width None below two seeds."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        return seeds, None, None
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return seeds, mean, None
    half = T975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return seeds, mean, half


def against_baseline(by_row: dict):
    """``(row, base_row, row's item, baseline's item)`` for each row of ``by_row`` whose baseline
    (BASELINES, else BASELINE) is in it too, the baseline itself left out."""
    for row, item in by_row.items():
        base_row = BASELINES.get(row, BASELINE)
        if row != base_row and base_row in by_row:
            yield row, base_row, item, by_row[base_row]


def cpu_of(record: dict) -> str:
    """The CPU (and GPU, if any) a record was trained on: its ``machine`` up to the torch version.
    One seed's AP moves ~4 points between CPU kinds (issue 36), so only runs of the same pair."""
    return re.split(r", (?:torch|code) ", record.get("machine", "unknown CPU"))[0]


def same_cpu_pairs(runs: Dict[int, dict], base: Dict[int, dict]):
    """The seeds both rows have, split into those trained on the same CPU (kept) and those whose
    two runs were trained on different CPUs (left out): ``(runs, base, left_out)``."""
    common = set(runs) & set(base)
    left_out = sorted(s for s in common if cpu_of(runs[s]) != cpu_of(base[s]))
    keep = common - set(left_out)
    return {s: runs[s] for s in keep}, {s: base[s] for s in keep}, left_out


def paired_reading(found: Dict[str, Dict[int, dict]]) -> List[str]:
    """One line per row against its baseline: per metric the paired difference over the common
    seeds trained on the same CPU with its 95% t interval, and what the interval says (above
    zero, below zero, or containing it: unknown)."""
    lines = []
    for row, base_row, all_runs, all_base in against_baseline(found):
        runs, base, left_out = same_cpu_pairs(all_runs, all_base)
        parts = []
        for key, label in PAIRED_METRICS.items():
            split, ap = key.split("_", 1)
            a = {s: r[split][ap] for s, r in runs.items() if split in r}
            b = {s: r[split][ap] for s, r in base.items() if split in r}
            seeds, mean, half = paired_interval(a, b)
            if mean is None:
                continue
            if half is None:
                parts.append(f"{label} {mean:+.1f} (one seed: no interval)")
                continue
            low, high = mean - half, mean + half
            says = "above 0" if low > 0 else "below 0" if high < 0 else "contains 0: unknown"
            parts.append(f"{label} {mean:+.1f} [{low:+.1f}, {high:+.1f}] ({says})")
        if parts:
            title, base_title = ROWS[row][0], ROWS[base_row][0]
            n = len(set(runs) & set(base))
            line = f"- {title} − {base_title}, {n} paired seeds: " + "; ".join(parts)
            if left_out:
                seeds = " ".join(map(str, left_out))
                line += f" (seed(s) {seeds} left out: the two runs were trained on different CPUs)"
            lines.append(line)
    return lines


def ema_reading(found: Dict[str, Dict[int, dict]]) -> List[str]:
    """One line per row whose records keep the raw weights' AP (``record["raw"]``, CBAM_HRNET.EMA
    recipes): the averaged weights minus the raw ones of the same runs, with the 95% t interval
    over the seeds."""
    lines = []
    for row, runs in found.items():
        parts = []
        for split in ("val", "val1k"):
            for ap in ("bbox_AP", "segm_AP"):
                have = {s: r for s, r in runs.items() if split in r.get("raw", {}) and split in r}
                if not have:
                    continue
                a = {s: r[split][ap] for s, r in have.items()}
                b = {s: r["raw"][split][ap] for s, r in have.items()}
                seeds, mean, half = paired_interval(a, b)
                interval = f" [{mean - half:+.1f}, {mean + half:+.1f}]" if half is not None else ""
                parts.append(f"{split} {ap.split('_')[0]} {mean:+.2f}{interval}")
        if parts:
            n = sum(1 for r in runs.values() if "raw" in r)
            lines.append(
                f"- {ROWS[row][0]}, averaged − raw weights, {n} run(s): " + "; ".join(parts)
            )
    return lines


def _mean_spread(values):
    return statistics.mean(values), (max(values) - min(values)) / 2


def _range(values: List[float], fmt: str) -> str:
    """min–max (times: records of other days and CPUs differ up to 2x, a mean would hide it)."""
    low, high = fmt.format(min(values)), fmt.format(max(values))
    return low if low == high else f"{low}–{high}"


def _values(runs: Dict[int, dict]) -> Dict[str, List[float]]:
    """Per metric (METRICS, infer_ms, train_min), its values over the runs; the times leave out
    a run whose record says ``"shared_cpu": true`` (it ran beside other work: its AP counts, its
    minutes do not)."""
    values = {}
    for key in METRICS:
        split, ap = key.split("_", 1)
        values[key] = [r[split][ap] for r in runs.values()]
    for key in ("infer_ms", "train_min"):
        values[key] = [r[key] for r in runs.values() if not r.get("shared_cpu")]
    return values


def _time_range(values: List[float], n_runs: int, fmt: str) -> str:
    """_range of the times of the runs that had the CPU alone, naming how many were left out."""
    shared = n_runs - len(values)
    if not values:
        return "shared CPU"
    return _range(values, fmt) + (f" ({shared} on a shared CPU left out)" if shared else "")


def reading(values: Dict[str, Dict[str, List[float]]]) -> List[str]:
    """One line per row against its baseline (BASELINES, else BASELINE): the difference of the
    means per metric and whether it lies outside the seed spread (every seed of one row above, or
    below, every seed of the other)."""
    lines = []
    for row, base_row, a_all, b_all in against_baseline(values):
        n, nb = len(a_all["val_bbox_AP"]), len(b_all["val_bbox_AP"])
        parts = []
        for key, label in METRICS.items():
            a, b = a_all[key], b_all[key]
            if min(n, nb) < 2:
                verdict = "one seed, no reading"
            elif min(a) > max(b):
                verdict = "outside the spread: every seed above"
            elif max(a) < min(b):
                verdict = "outside the spread: every seed below"
            else:
                verdict = "within the seed spread"
            parts.append(f"{label} {statistics.mean(a) - statistics.mean(b):+.1f} ({verdict})")
        title, base_title = ROWS[row][0], ROWS[base_row][0]
        lines.append(f"- {title} vs {base_title} ({n} vs {nb} seeds): " + "; ".join(parts))
    return lines


def _records(budget: str, row: str, seeds, runs: str, pool=()) -> dict:
    """The records of ``row`` by seed; with ``pool`` (other budgets of the same recipe), theirs
    too (their default seeds), keyed "BUDGET:seed" (and the budget's own by "seed")."""
    found = {}
    for b, b_seeds in [(budget, seeds), *((b, BUDGETS[b][1]) for b in pool)]:
        for seed in b_seeds:
            path = record_path(b, row, seed, runs)
            if os.path.exists(path):
                key = seed if not pool else str(seed) if b == budget else f"{b}:{seed}"
                with open(path) as f:
                    found[key] = json.load(f)
    return found


def report(budget: str, rows, seeds, dest: str, runs: str = RUNS, pool=()) -> str:
    """results_BUDGET.md / .json from the committed records; returns the Markdown: the table and
    the reading of each row against its baseline, where that has records. With ``pool`` (budgets
    that trained the same recipe, e.g. ``full`` for ``quickstart``), their records join as further
    runs (results_BUDGET_pooled.md / .json): each pair is still one seed of both rows on one CPU."""
    table, data, values_of, found_of = [], {}, {}, {}
    for row in rows:
        found = _records(budget, row, seeds, runs, pool)
        if not found:
            continue
        found_of[row] = found
        values = values_of[row] = _values(found)
        stats = {k: _mean_spread(v) for k, v in values.items() if v}
        data[row] = {"seeds": found, "mean_spread": stats}

        def fmt(k):
            return f"{stats[k][0]:.1f} ± {stats[k][1]:.1f}"

        per_seed = ", ".join(
            f"{s}: {r['val']['bbox_AP']:.1f}/{r['hard']['bbox_AP']:.1f}" for s, r in found.items()
        )
        table.append(
            [ROWS[row][0], len(found), *(fmt(k) for k in METRICS)]
            + [
                _time_range(values["infer_ms"], len(found), "{:.0f}"),
                _time_range(values["train_min"], len(found), "{:.0f}"),
                per_seed,
            ]
        )
    headers = ["model", "seeds", *(f"{label} AP" for label in METRICS.values())]
    headers += ["infer ms/img (range)", "train min (range)", "per seed (val/hard bbox)"]
    md = tabulate(table, headers=headers, tablefmt="pipe", disable_numparse=True)
    lines = reading(values_of)
    paired = paired_reading(found_of)
    os.makedirs(dest, exist_ok=True)
    if lines:
        md += "\n\nEach row against its baseline (difference of the means, AP):\n\n" + "\n".join(
            lines
        )
    ema_lines = ema_reading(found_of)
    if ema_lines:
        md += (
            "\n\nCBAM_HRNET.EMA's own gain (the same runs' final weights, averaged − raw, AP):\n\n"
        )
        md += "\n".join(ema_lines)
    if paired:
        md += (
            "\n\nPaired differences (same seeds, row − baseline; mean and 95% t interval over "
            "the seeds):\n\n" + "\n".join(paired)
        )
    stem = f"results_{budget}_pooled" if pool else f"results_{budget}"
    if pool:
        md = f"Runs of budget {budget} and of {', '.join(pool)} (same recipe), pooled:\n\n" + md
    for name, text in (
        (f"{stem}.md", md + "\n"),
        (f"{stem}.json", json.dumps(data, indent=2)),
    ):
        with open(os.path.join(dest, name), "w") as f:
            f.write(text)
    logger.info("Table (mean ± half the spread over seeds) in %s/%s.md:\n%s", dest, stem, md)
    return md


def core_groups(cores: List[int], n: int) -> List[List[int]]:
    """``cores`` split into ``n`` equal groups for ``n`` runs side by side (any rest stays idle)."""
    size = len(cores) // max(1, n)
    if size < 1:
        raise ValueError(
            f"--parallel {n}: this process may use {len(cores)} core(s), so at most "
            f"{len(cores)} runs side by side; lower --parallel."
        )
    return [cores[i * size : (i + 1) * size] for i in range(n)]


def run_all(budget: str, todo: List[tuple], out: str, parallel: int, after_each) -> None:
    """Every (row, seed) of ``todo`` through :func:`run_one`, one at a time or ``parallel`` side
    by side (each on its own cores), ``after_each()`` after each; progress and ETA logged."""
    import concurrent.futures
    import queue
    import threading

    start, done, lock = time.time(), [0], threading.Lock()
    free = queue.Queue()
    if parallel > 1:
        for group in core_groups(sorted(os.sched_getaffinity(0)), parallel):
            free.put(group)
    else:
        free.put(None)

    def one(row: str, seed: int) -> None:
        cores = free.get()
        try:
            run_dir = os.path.join(out, budget, row, f"seed{seed}")
            run_one(budget, row, seed, run_dir, cores, beside=parallel - 1 if cores else 0)
        finally:
            free.put(cores)
        with lock:
            done[0] += 1
            rate = (time.time() - start) / done[0]
            eta = rate * (len(todo) - done[0]) / 60
            logger.info("%d/%d runs done, ETA %.0f min", done[0], len(todo), eta)
            after_each()

    with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
        for future in [pool.submit(one, row, seed) for row, seed in todo]:
            future.result()  # a failed run stops the sweep with its error


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", choices=list(BUDGETS), default="full")
    parser.add_argument(
        "--rows", nargs="+", default=["cbam_branches", "no_cbam"], choices=list(ROWS)
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the budget's")
    parser.add_argument("--out", default=os.path.join(REPO, "output", "cbam_ablation"))
    parser.add_argument("--dest", default=HERE, help="where results_BUDGET.md / .json go")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--pool",
        nargs="*",
        default=[],
        choices=list(BUDGETS),
        help="also write results_BUDGET_pooled.md with these budgets' runs (the same recipe)",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="runs side by side, each pinned to its share of the cores (a lent GPU's machine)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    seeds = args.seeds or BUDGETS[args.budget][1]
    if not args.report_only:
        todo = [
            (r, s)
            for s in seeds
            for r in args.rows
            if not os.path.exists(record_path(args.budget, r, s))
        ]
        ensure_hard_set()
        run_all(
            args.budget,
            todo,
            args.out,
            args.parallel,
            lambda: report(args.budget, args.rows, seeds, args.dest),
        )
    report(args.budget, args.rows, seeds, args.dest)
    if args.pool:
        report(args.budget, args.rows, seeds, args.dest, pool=args.pool)


if __name__ == "__main__":
    main()
