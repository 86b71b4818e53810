#!/usr/bin/env python
"""Run the CBAM ablation and write its table (Markdown + JSON) from the runs' files:

    # all rows, seeds 1 2 (~80 min, 2-core CPU)
    python projects/cbam_ablation/run_ablation.py
    # rebuild the table from finished runs
    python projects/cbam_ablation/run_ablation.py --report-only

Each (row, seed) trains with ``train_net.py`` into ``--out/ROW/seedN`` and is skipped when its
``results.json`` exists, so an interrupted sweep continues where it stopped. Inference ms/image is
detectron2's "pure compute time" of the final evaluation (batch 1, 200 val images); training minutes
are the run's wall time minus that evaluation.
"""

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import time

from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from tabulate import tabulate

from cbam_hrnet_d2.config import load_config
from cbam_hrnet_d2.files import atomic_write_text

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

ROWS = {
    "cbam_branches": "CBAM on HRNet-W18 branches (seed design)",
    "cbam_fpn": "CBAM after the FPN",
    "no_cbam": "HRNet-W18, no CBAM",
    "r50_fpn": "Detectron2 R50-FPN",
}
logger = logging.getLogger("cbam_ablation")


def config_path(row: str) -> str:
    return os.path.join(HERE, "configs", f"{row}.yaml")


def run_one(row: str, seed: int, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    cmd = [
        sys.executable,
        os.path.join(REPO, "train_net.py"),
        "--config-file",
        config_path(row),
        "SEED",
        str(seed),
        "OUTPUT_DIR",
        out,
    ]
    logger.info("Running %s", " ".join(cmd))
    start = time.time()
    with open(os.path.join(out, "stdout.txt"), "w") as log:
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONWARNINGS="ignore"),
        )
    wall = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"{row} seed {seed} failed (exit {proc.returncode}); see {out}/stdout.txt"
        )
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump({"wall_s": wall, "command": cmd}, f)


def _seconds(text: str) -> float:
    h, m, s = text.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def read_run(out: str) -> dict:
    with open(os.path.join(out, "results.json")) as f:
        results = next(iter(json.load(f).values()))
    with open(os.path.join(out, "run.json")) as f:
        wall = json.load(f)["wall_s"]
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read()
    total = re.findall(r"Total inference time: ([0-9:.]+)", log)[-1]
    pure = re.findall(r"Total inference pure compute time: .*?\(([0-9.]+) s / iter", log)[-1]
    return {
        "bbox_AP": results["bbox"]["AP"],
        "segm_AP": results["segm"]["AP"],
        "infer_ms": float(pure) * 1000,
        "train_min": (wall - _seconds(total)) / 60,
    }


def _mean_spread(values):
    mean = statistics.mean(values)
    return mean, (max(values) - min(values)) / 2


def report(root: str, rows, seeds, dest: str) -> None:
    table, data = [], {}
    for row in rows:
        runs = {}
        for seed in seeds:
            out = os.path.join(root, row, f"seed{seed}")
            if os.path.exists(os.path.join(out, "run.json")):
                runs[seed] = read_run(out)
        if not runs:
            continue
        cfg = load_config(config_path(row))
        params = sum(p.numel() for p in build_model(cfg).parameters())
        stats = {k: _mean_spread([r[k] for r in runs.values()]) for k in next(iter(runs.values()))}
        data[row] = {"seeds": runs, "params": params, "mean_spread": stats}
        fmt = lambda k: f"{stats[k][0]:.1f} ± {stats[k][1]:.1f}"  # noqa: E731
        table.append(
            [
                ROWS[row],
                fmt("bbox_AP"),
                fmt("segm_AP"),
                f"{params / 1e6:.2f} M",
                f"{stats['infer_ms'][0]:.0f}",
                f"{stats['train_min'][0]:.1f}",
                ", ".join(f"{s}: {r['bbox_AP']:.1f}/{r['segm_AP']:.1f}" for s, r in runs.items()),
            ]
        )
    headers = [
        "model",
        "bbox AP",
        "segm AP",
        "params",
        "inference ms/img",
        "train min",
        "per seed (bbox/segm)",
    ]
    md = tabulate(table, headers=headers, tablefmt="pipe", disable_numparse=True)
    for name, text in (("results.md", md + "\n"), ("results.json", json.dumps(data, indent=2))):
        atomic_write_text(os.path.join(dest, name), text)
    logger.info("Table (mean ± half the spread over seeds) written to %s/results.md:\n%s", dest, md)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--out", default=os.path.join(REPO, "output", "cbam_ablation"))
    parser.add_argument("--dest", default=HERE, help="where results.md / results.json go")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    setup_logger(name="cbam_ablation")
    if not args.report_only:
        todo = [
            (r, s)
            for s in args.seeds
            for r in args.rows
            if not os.path.exists(os.path.join(args.out, r, f"seed{s}", "run.json"))
        ]
        start = time.time()
        for i, (row, seed) in enumerate(todo):
            run_one(row, seed, os.path.join(args.out, row, f"seed{seed}"))
            done = time.time() - start
            logger.info(
                "%d/%d runs done, ETA %.0f min",
                i + 1,
                len(todo),
                done / (i + 1) * (len(todo) - i - 1) / 60,
            )
            report(args.out, args.rows, args.seeds, args.dest)
    report(args.out, args.rows, args.seeds, args.dest)


if __name__ == "__main__":
    main()
