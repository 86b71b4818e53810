#!/usr/bin/env python
"""Where the seed spread of the quickstart recipe comes from (issue 36): evaluation noise and
training noise, measured on finished runs.

    # AP of every checkpoint of a run (model_0000099.pth, ...) on shapes_val: the AP curve
    python projects/cbam_ablation/spread.py curve output/runs/cbam_s2 --name base_cbam_s2
    # one model on shapes_val and on shapes_val1k (1000 images drawn with another seed), and the
    # AP of each of five disjoint 200-image parts of shapes_val1k: the noise of a 200-image set
    python projects/cbam_ablation/spread.py evalnoise output/runs/cbam_s2/model_final.pth \
        --name base_cbam_s2
    # curves side by side (a Markdown table: bbox AP and total loss per checkpoint)
    python projects/cbam_ablation/spread.py table cosine_s2 cosine_s42

Each writes ``spread/NAME_{curve,evalnoise}.json`` here (committed) with the run's loss curve
(``metrics.json`` of the run's folder: total loss every 20 iterations, and its largest jumps).
Evaluation: the run's own config (``config.yaml`` of its folder), ``TEST.PRECISION fp32``, batch 1,
detectron2's ``COCOEvaluator``; the parts' APs are pycocotools' COCOeval on the same detections,
restricted to each part's images.
"""

import argparse
import contextlib
import glob
import io
import json
import logging
import os
import re
import statistics
import sys
from typing import Dict, List, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "spread")
logger = logging.getLogger("cbam_ablation.spread")


def loss_curve(run_dir: str) -> Dict[str, list]:
    """The run's total loss (detectron2's 20-iteration median) per logged iteration, and the five
    largest rises from one logged value to the next (a spike shows there)."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    points = [(r["iteration"], r["total_loss"]) for r in rows if "total_loss" in r]
    rises = sorted(((b[1] - a[1], b[0]) for a, b in zip(points, points[1:])), reverse=True)[:5]
    return {
        "total_loss": [[i, round(v, 4)] for i, v in points],
        "largest_rises": [[i, round(d, 4)] for d, i in rises],
    }


def build(run_dir: str, opts: Sequence[str] = ()):
    """(cfg, model) of the run in ``run_dir`` (its config.yaml), fp32, on the CPU."""
    from detectron2.modeling import build_model

    from cbam_hrnet_d2.config import load_config
    from cbam_hrnet_d2.data import register_from_cfg

    cfg = load_config(os.path.join(run_dir, "config.yaml"), ["TEST.PRECISION", "fp32", *opts])
    cfg.OUTPUT_DIR = os.path.join(run_dir, "spread_eval")
    register_from_cfg(cfg)
    return cfg, build_model(cfg).eval()


def evaluate(cfg, model, weights: str, dataset: str) -> Dict[str, float]:
    """bbox / segm AP of ``weights`` on ``dataset``; the detections stay in
    ``cfg.OUTPUT_DIR/inference/<dataset>/coco_instances_results.json``."""
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset

    from cbam_hrnet_d2.checkpoint import SafeCheckpointer
    from cbam_hrnet_d2.engine import Trainer

    SafeCheckpointer(model).load(weights)
    out = os.path.join(cfg.OUTPUT_DIR, "inference", dataset)
    evaluator = COCOEvaluator(dataset, tasks=("bbox", "segm"), output_dir=out)
    results = inference_on_dataset(model, Trainer.build_test_loader(cfg, dataset), evaluator)
    return {"bbox_AP": results["bbox"]["AP"], "segm_AP": results["segm"]["AP"]}


def part_aps(dataset: str, results_json: str, parts: int) -> List[Dict[str, float]]:
    """bbox / segm AP of each of ``parts`` disjoint, equal parts of ``dataset``'s images (in id
    order), from the detections in ``results_json``."""
    from detectron2.data import MetadataCatalog
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(MetadataCatalog.get(dataset).json_file)
    with open(results_json) as f:
        detections = json.load(f)
    ids = sorted(gt.getImgIds())
    size = len(ids) // parts
    out = []
    for k in range(parts):
        part = ids[k * size : (k + 1) * size]
        row = {}
        for task in ("bbox", "segm"):
            dets = [d for d in detections if d["image_id"] in set(part)]
            with contextlib.redirect_stdout(io.StringIO()):
                ev = COCOeval(gt, gt.loadRes(dets), task)
                ev.params.imgIds = part
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
            row[f"{task}_AP"] = ev.stats[0] * 100
        out.append(row)
    return out


def _write(name: str, kind: str, data: dict) -> str:
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, f"{name}_{kind}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    logger.info("wrote %s", path)
    return path


def curve(run_dir: str, name: str) -> dict:
    cfg, model = build(run_dir)
    files = sorted(glob.glob(os.path.join(run_dir, "model_*.pth")))
    files = [f for f in files if re.search(r"model_(\d+|final)\.pth$", f)]
    points = []
    for i, path in enumerate(files):
        aps = evaluate(cfg, model, path, "shapes_val")
        label = os.path.basename(path)[len("model_") : -len(".pth")]
        points.append({"checkpoint": label, **{k: round(v, 2) for k, v in aps.items()}})
        logger.info("[%d/%d] %s: %s", i + 1, len(files), label, points[-1])
    data = {"run": run_dir, "ap": points, **loss_curve(run_dir)}
    _write(name, "curve", data)
    return data


def _loss_at(losses: List[list], iteration: int):
    """The logged total loss nearest to ``iteration`` (logged every 20 iterations)."""
    if not losses:
        return None
    return min(losses, key=lambda p: abs(p[0] - iteration))[1]


def side_by_side(names: Sequence[str], out: str = OUT) -> str:
    """The AP curves ``spread/NAME_curve.json`` of several runs as one Markdown table: a row per
    checkpoint, per run its bbox AP and the total loss logged nearest to that checkpoint."""
    from tabulate import tabulate

    curves = {}
    for name in names:
        path = os.path.join(out, f"{name}_curve.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path}: no curve of that name; make it first: spread.py curve RUN_DIR "
                f"--name {name}"
            )
        with open(path) as f:
            curves[name] = json.load(f)
    labels = sorted(
        {p["checkpoint"] for c in curves.values() for p in c["ap"]}, key=lambda x: (x == "final", x)
    )
    rows = []
    for label in labels:
        row = [label]
        for c in curves.values():
            point = next((p for p in c["ap"] if p["checkpoint"] == label), None)
            losses = c.get("total_loss", [])
            if label != "final":
                loss = _loss_at(losses, int(label))
            else:
                loss = losses[-1][1] if losses else None
            row += [
                f"{point['bbox_AP']:.1f}" if point else "",
                f"{loss:.3f}" if loss is not None else "",
            ]
        rows.append(row)
    headers = ["checkpoint"] + [h for n in curves for h in (f"{n} bbox AP", f"{n} loss")]
    return tabulate(rows, headers=headers, tablefmt="pipe", disable_numparse=True)


def evalnoise(weights: str, name: str, parts: int = 5) -> dict:
    run_dir = os.path.dirname(os.path.abspath(weights))
    cfg, model = build(run_dir)
    val = evaluate(cfg, model, weights, "shapes_val")
    big = evaluate(cfg, model, weights, "shapes_val1k")
    results = os.path.join(
        cfg.OUTPUT_DIR, "inference", "shapes_val1k", "coco_instances_results.json"
    )
    split = part_aps("shapes_val1k", results, parts)
    spread = {
        k: {
            "min": round(min(p[k] for p in split), 2),
            "max": round(max(p[k] for p in split), 2),
            "stdev": round(statistics.stdev(p[k] for p in split), 2),
        }
        for k in ("bbox_AP", "segm_AP")
    }
    data = {
        "weights": weights,
        "shapes_val": {k: round(v, 2) for k, v in val.items()},
        "shapes_val1k": {k: round(v, 2) for k, v in big.items()},
        f"shapes_val1k_{parts}_parts": [{k: round(v, 2) for k, v in p.items()} for p in split],
        "parts_spread": spread,
    }
    _write(name, "evalnoise", data)
    return data


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("curve", help="AP of every checkpoint of a run, and its loss curve")
    c.add_argument("run_dir")
    c.add_argument("--name", required=True)
    e = sub.add_parser("evalnoise", help="one model on shapes_val, shapes_val1k and its parts")
    e.add_argument("weights")
    e.add_argument("--name", required=True)
    e.add_argument("--parts", type=int, default=5)
    t = sub.add_parser("table", help="curves made by 'curve' side by side, as Markdown")
    t.add_argument("names", nargs="+")
    args = parser.parse_args(argv)
    if args.what == "table":
        print(side_by_side(args.names))  # the table is the command's output
        return
    from detectron2.utils.logger import setup_logger

    import cbam_hrnet_d2.data  # noqa: F401  (registers the shapes splits)

    setup_logger(name="cbam_ablation")
    if args.what == "curve":
        curve(args.run_dir, args.name)
    else:
        evalnoise(args.weights, args.name, args.parts)


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main()
