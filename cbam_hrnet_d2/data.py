"""Datasets: the embedded synthetic ``shapes`` instance-segmentation set and COCO-json registration.

``shapes_train`` / ``shapes_val`` live under ``$DETECTRON2_DATASETS/shapes/`` (default ``datasets/``)
as PNG images + COCO json with polygon masks, and are generated on first use (or by
``python -m cbam_hrnet_d2.data --out DIR``). Generation is deterministic: same seed, same files.
"""
import argparse
import json
import logging
import math
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.utils import comm
from tqdm import tqdm

from .data_check import check_dataset, validate_coco_json

__all__ = [
    "SHAPES_CATEGORIES",
    "SHAPES_SPLITS",
    "shapes_root",
    "generate_shapes",
    "ensure_shapes",
    "register_shapes",
    "register_coco_json",
    "register_from_cfg",
    "validate_coco_json",
    "check_datasets",
    "check_dataset",
]

logger = logging.getLogger(__name__)

# COCO category ids 1..6, in this order.
SHAPES_CATEGORIES: Tuple[str, ...] = ("square", "circle", "triangle", "hexagon", "pentagon", "star")
# split -> (number of images, seed)
SHAPES_SPLITS: Dict[str, Tuple[int, int]] = {"train": (2000, 1), "val": (200, 2)}
_IMAGE_SIZES = (128, 192)  # side lengths are drawn from this range (both ends included)
_MAX_OBJECTS = 6
_MIN_VISIBLE = 0.6  # an object keeps at least this fraction of its area visible


def shapes_root(root: Optional[str] = None) -> str:
    """``root`` or ``$DETECTRON2_DATASETS`` (default "datasets"), joined with "shapes"."""
    return os.path.join(root or os.getenv("DETECTRON2_DATASETS", "datasets"), "shapes")


# ---------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------
def _regular_polygon(n: int, star: bool = False) -> np.ndarray:
    """Unit-radius vertices, first vertex up; a star alternates outer and inner (0.45) radii."""
    k = 2 * n if star else n
    angles = -math.pi / 2 + np.arange(k) * 2 * math.pi / k
    radii = np.where(np.arange(k) % 2 == 0, 1.0, 0.45) if star else np.ones(k)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _shape_outline(category: str, rng: np.random.Generator) -> np.ndarray:
    """Vertices (K, 2) of a shape of radius ~1 centred at 0, before rotation and scaling."""
    if category == "square":
        return _regular_polygon(4) * math.sqrt(2) / 1.3
    if category == "circle":
        return _regular_polygon(64)
    if category == "triangle":
        # equilateral to isosceles, apex up
        pts = _regular_polygon(3)
        pts[:, 0] *= rng.uniform(0.75, 1.25)
        return pts
    if category == "hexagon":
        return _regular_polygon(6)
    if category == "pentagon":
        return _regular_polygon(5)
    if category == "star":
        return _regular_polygon(5, star=True)
    raise ValueError(category)


def _random_colour(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    """A colour at least 120 (L1 over BGR) away from ``avoid``."""
    for _ in range(50):
        c = rng.integers(0, 256, 3)
        if np.abs(c - avoid).sum() >= 120:
            return c
    return 255 - avoid


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    kind = rng.choice(["plain", "gradient", "noise", "stripes", "checker"])
    base = rng.integers(0, 256, 3).astype(np.float32)
    if kind == "plain":
        img = np.broadcast_to(base, (h, w, 3)).copy()
    elif kind == "gradient":
        other = rng.integers(0, 256, 3).astype(np.float32)
        t = np.linspace(0, 1, w if rng.random() < 0.5 else h, dtype=np.float32)
        t = t[None, :, None] if t.shape[0] == w else t[:, None, None]
        img = base * (1 - t) + other * t
        img = np.broadcast_to(img, (h, w, 3)).copy()
    elif kind == "noise":
        cell = int(rng.integers(4, 24))
        small = rng.normal(0, rng.uniform(15, 50), (h // cell + 2, w // cell + 2, 3))
        img = base + cv2.resize(small.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    else:
        other = rng.integers(0, 256, 3).astype(np.float32)
        period = int(rng.integers(6, 24))
        yy, xx = np.mgrid[0:h, 0:w]
        if kind == "stripes":
            ang = rng.uniform(0, math.pi)
            phase = (xx * math.cos(ang) + yy * math.sin(ang)) // period
        else:
            phase = xx // period + yy // period
        sel = (phase % 2 == 0)[..., None]
        img = np.where(sel, base, base * 0.6 + other * 0.4)
    # thin clutter lines that are not objects
    for _ in range(int(rng.integers(0, 4))):
        p1 = tuple(int(v) for v in rng.integers(0, [w, h]))
        p2 = tuple(int(v) for v in rng.integers(0, [w, h]))
        cv2.line(img, p1, p2, rng.integers(0, 256, 3).tolist(), 1, cv2.LINE_AA)
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw_image(index: int, seed: int) -> Tuple[np.ndarray, List[dict]]:
    """One image (H, W, 3) BGR uint8 and its annotations (category_id, polygons, bbox, area)."""
    rng = np.random.default_rng([seed, index])
    h, w = (int(v) for v in rng.integers(_IMAGE_SIZES[0], _IMAGE_SIZES[1] + 1, 2))
    img = _background(h, w, rng)
    bg_mean = img.reshape(-1, 3).mean(0)
    objects: List[dict] = []  # each: category, full mask, polygon
    visible = np.zeros((h, w), np.int16)  # index + 1 of the object on top, 0 = background
    for _ in range(int(rng.integers(1, _MAX_OBJECTS + 1))):
        for _attempt in range(20):
            cat = int(rng.integers(len(SHAPES_CATEGORIES)))
            radius = rng.uniform(0.08, 0.3) * min(h, w)
            pts = _shape_outline(SHAPES_CATEGORIES[cat], rng)
            ang = rng.uniform(0, 2 * math.pi)
            rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
            pts = pts @ rot.T * radius
            # centre may leave part of the shape outside the image (truncated objects)
            centre = rng.uniform([0.05 * w, 0.05 * h], [0.95 * w, 0.95 * h])
            poly = np.round(pts + centre).astype(np.int32)
            mask = np.zeros((h, w), np.uint8)
            cv2.fillPoly(mask, [poly], 1)
            area = int(mask.sum())
            if area < 40:
                continue
            covered = np.bincount(visible[mask > 0], minlength=len(objects) + 1)[1:]
            ok = all(
                (o["visible"] - covered[i]) >= _MIN_VISIBLE * o["area"] for i, o in enumerate(objects)
            )
            if ok:
                break
        else:
            continue
        colour = _random_colour(rng, bg_mean)
        shade = rng.uniform(0.0, 0.25)  # optional fill texture
        fill = np.broadcast_to(colour.astype(np.float32), (h, w, 3))
        if shade > 0.05:
            fill = fill * (1 - shade * rng.random((h, w, 1)).astype(np.float32))
        layer = img.copy()
        cv2.fillPoly(layer, [poly], (255, 255, 255), cv2.LINE_AA)
        alpha = np.zeros((h, w), np.uint8)
        cv2.fillPoly(alpha, [poly], 255, cv2.LINE_AA)
        a = (alpha.astype(np.float32) / 255)[..., None]
        img = (img * (1 - a) + fill * a).astype(np.uint8)
        for i, o in enumerate(objects):
            o["visible"] -= int(covered[i])
        visible[mask > 0] = len(objects) + 1
        objects.append({"category": cat, "area": area, "visible": area, "poly": poly})
    noise = rng.uniform(0, 8)
    if noise > 2:
        img = np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (3, 3), 0)
    return img, _annotations(objects, visible)


def _annotations(objects: List[dict], visible: np.ndarray) -> List[dict]:
    anns = []
    h, w = visible.shape
    for i, o in enumerate(objects):
        mask = (visible == i + 1).astype(np.uint8)
        if o["visible"] == o["area"] and o["poly"].min() >= 0 and (o["poly"] < [w, h]).all():
            polys = [o["poly"].astype(float).ravel().tolist()]  # unoccluded: the exact outline
        else:
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            polys = [c.reshape(-1).astype(float).tolist() for c in contours if cv2.contourArea(c) >= 4]
            polys = [p for p in polys if len(p) >= 6]
        if not polys:
            continue
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        anns.append(
            {
                "category_id": o["category"] + 1,
                "segmentation": polys,
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "area": float(mask.sum()),
                "iscrowd": 0,
            }
        )
    return anns


def generate_shapes(out_dir: str, split: str, num_images: int, seed: int) -> str:
    """Write ``out_dir/{split}/*.png`` and ``out_dir/{split}.json`` (COCO). The split is built in a
    temporary directory and moved into place, so an interrupted run leaves nothing half-written.

    Returns:
        str: path of the json file.
    """
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{split}-", dir=out_dir)
    images, annotations = [], []
    try:
        os.makedirs(os.path.join(tmp, split))
        for idx in tqdm(range(num_images), desc=f"shapes_{split}", unit="img", mininterval=1.0):
            img, anns = _draw_image(idx, seed)
            file_name = f"{idx:06d}.png"
            cv2.imwrite(os.path.join(tmp, split, file_name), img)
            images.append(
                {"id": idx + 1, "file_name": file_name, "height": img.shape[0], "width": img.shape[1]}
            )
            for ann in anns:
                annotations.append({"id": len(annotations) + 1, "image_id": idx + 1, **ann})
        coco = {
            "info": {"description": f"cbam_hrnet_d2 synthetic shapes, split {split}, seed {seed}"},
            "images": images,
            "annotations": annotations,
            "categories": [
                {"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPES_CATEGORIES)
            ],
        }
        with open(os.path.join(tmp, f"{split}.json"), "w") as f:
            json.dump(coco, f)
        for name in (split, f"{split}.json"):
            dst = os.path.join(out_dir, name)
            if os.path.isdir(dst):
                shutil.rmtree(dst)
            os.replace(os.path.join(tmp, name), dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Wrote %d images, %d instances to %s", len(images), len(annotations), out_dir)
    return os.path.join(out_dir, f"{split}.json")


def ensure_shapes(root: Optional[str] = None, splits: Sequence[str] = tuple(SHAPES_SPLITS)) -> None:
    """Generate the shapes splits under ``shapes_root(root)`` that are not there yet."""
    out = shapes_root(root)
    for split in splits:
        if not os.path.isfile(os.path.join(out, f"{split}.json")):
            num, seed = SHAPES_SPLITS[split]
            logger.info("Generating shapes_%s (%d images) in %s", split, num, out)
            generate_shapes(out, split, num, seed)
        else:
            logger.info("shapes_%s is in %s (`python -m cbam_hrnet_d2.data --force` regenerates)", split, out)


def load_coco_instances(json_file: str, image_root: str, name: str) -> List[dict]:
    """detectron2's ``load_coco_json`` after :func:`validate_coco_json` (errors name the file and the
    entry, also when called through ``DatasetCatalog.get``), plus: instances whose segmentation is
    empty are dropped too (detectron2 keeps them without a mask, which breaks mask training), with one
    counted warning."""
    validate_coco_json(json_file, image_root)
    try:
        dicts = load_coco_json(json_file, image_root, name)
    except (KeyError, TypeError, ValueError, AssertionError) as e:
        raise ValueError(
            f"Dataset {name!r}: detectron2 could not load {json_file} ({type(e).__name__}: {e}); "
            f"`python -m cbam_hrnet_d2.data --check {name}` lists what is wrong with it"
        ) from e
    dropped = 0
    for d in dicts:
        kept = [a for a in d.get("annotations", []) if "segmentation" in a]
        dropped += len(d.get("annotations", [])) - len(kept)
        d["annotations"] = kept
    if dropped:
        logger.warning("%s: dropped %d instances with an empty segmentation", json_file, dropped)
    return dicts


def register_coco_json(name: str, json_file: str, image_root: str) -> None:
    """Register a COCO-format instance dataset under ``name`` (loader + metadata for COCOEvaluator)."""
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if getattr(meta, "json_file", None) == json_file and getattr(meta, "image_root", None) == image_root:
            return
        raise ValueError(f"Dataset {name!r} is already registered with other files; pick another name")
    DatasetCatalog.register(name, lambda: load_coco_instances(json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")


def register_shapes(root: Optional[str] = None) -> None:
    """Register ``shapes_train`` and ``shapes_val``; loading generates missing files first."""
    out = shapes_root(root)
    for split in SHAPES_SPLITS:
        name = f"shapes_{split}"
        json_file, image_root = os.path.join(out, f"{split}.json"), os.path.join(out, split)

        def load(split=split, json_file=json_file, image_root=image_root, name=name):
            ensure_shapes(root, [split])
            return load_coco_instances(json_file, image_root, name)

        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
            thing_classes=list(SHAPES_CATEGORIES),
        )


def register_from_cfg(cfg) -> None:
    """Register every ``[name, json_file, image_root]`` of ``cfg.DATASETS.REGISTER_COCO``."""
    for i, entry in enumerate(cfg.DATASETS.REGISTER_COCO):
        if len(entry) != 3:
            raise ValueError(
                f"DATASETS.REGISTER_COCO[{i}] = {entry!r}; each entry must be [name, json_file, image_root]"
            )
        register_coco_json(*entry)


def check_datasets(cfg) -> None:
    """Fail early, with where it looked and how to fix it, if a dataset of the cfg is missing.
    Missing shapes splits are generated (on the main process only)."""
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        if name not in DatasetCatalog.list():
            raise KeyError(
                f"Dataset {name!r} (in DATASETS.TRAIN/TEST) is not registered. Register it with "
                "DATASETS.REGISTER_COCO [[name, json_file, image_root]] or use one of: "
                "shapes_train, shapes_val, coco_2017_train, coco_2017_val, ..."
            )
        meta = MetadataCatalog.get(name)
        if name.startswith("shapes_") and comm.is_main_process():
            ensure_shapes(os.path.dirname(os.path.dirname(meta.json_file)), [name[len("shapes_"):]])
        comm.synchronize()
        for what in ("json_file", "image_root"):
            path = getattr(meta, what, None)
            if path is not None and not os.path.exists(path):
                raise FileNotFoundError(
                    f"Dataset {name!r}: {what} {path} does not exist. Datasets are looked up under "
                    f"$DETECTRON2_DATASETS (now {os.getenv('DETECTRON2_DATASETS', 'datasets')!r}); for "
                    "COCO 2017 place coco/annotations/instances_{train,val}2017.json and "
                    "coco/{train,val}2017/ there (see datasets/README.md), for the shapes set run "
                    "`python -m cbam_hrnet_d2.data`, for other data fix DATASETS.REGISTER_COCO."
                )
        if getattr(meta, "json_file", None) and comm.is_main_process():
            validate_coco_json(meta.json_file, meta.image_root)


register_shapes()


def main(argv: Optional[Sequence[str]] = None) -> int:
    from detectron2.utils.logger import setup_logger

    parser = argparse.ArgumentParser(
        description="Generate the embedded shapes dataset, or check registered datasets (--check)."
    )
    parser.add_argument("--out", default=None, help="dataset root (default $DETECTRON2_DATASETS)")
    parser.add_argument("--splits", nargs="+", default=list(SHAPES_SPLITS), choices=list(SHAPES_SPLITS))
    parser.add_argument("--force", action="store_true", help="regenerate existing splits")
    parser.add_argument(
        "--check", nargs="+", metavar="NAME",
        help="check these registered datasets: every image decodes, its size matches the json, every "
        "box and mask is valid (shapes_*, coco_2017_*, or names of --config-file's DATASETS.REGISTER_COCO)",
    )
    parser.add_argument("--config-file", default=None, help="with --check: register its DATASETS.REGISTER_COCO")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="with --config-file: KEY VALUE overrides")
    args = parser.parse_args(argv)
    setup_logger(name=logger.name)
    if args.check:
        if args.config_file:
            from .engine import load_config

            register_from_cfg(load_config(args.config_file, args.opts))
        bad = 0
        for name in args.check:
            if name not in DatasetCatalog.list():
                logger.error("Dataset %r is not registered (give --config-file for DATASETS.REGISTER_COCO)", name)
                bad += 1
                continue
            if name.startswith("shapes_"):
                ensure_shapes(args.out, [name[len("shapes_"):]])
            problems = check_dataset(name)
            for line in problems:
                logger.error("%s: %s", name, line)
            logger.info("%s: %s", name, f"{len(problems)} problem(s)" if problems else "ok")
            bad += len(problems)
        return 1 if bad else 0
    if args.force:
        for split in args.splits:
            generate_shapes(shapes_root(args.out), split, *SHAPES_SPLITS[split])
    ensure_shapes(args.out, args.splits)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
