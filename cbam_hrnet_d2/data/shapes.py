"""The embedded synthetic ``shapes`` instance-segmentation set: drawing and writing it.

``shapes_train`` / ``shapes_val`` live under ``$DETECTRON2_DATASETS/shapes/`` (default
``datasets/``) as PNG images + COCO json with polygon masks, and are generated on first use (or by
``python -m cbam_hrnet_d2.data --out DIR``). Generation is deterministic: same seed, same files."""

import json
import logging
import math
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from tqdm import tqdm

__all__ = ["SHAPES_CATEGORIES", "SHAPES_SPLITS", "shapes_root", "generate_shapes", "ensure_shapes"]

logger = logging.getLogger(__name__)

# COCO category ids 1..6, in this order.
SHAPES_CATEGORIES: Tuple[str, ...] = ("square", "circle", "triangle", "hexagon", "pentagon", "star")
# split -> (number of images, seed). val1k: drawn independently of val (another seed), 5x as many
# images, for evaluations whose noise must be small (docs/notes/cpu-recipe.md, "Where the spread
# comes
# from")
SHAPES_SPLITS: Dict[str, Tuple[int, int]] = {
    "train": (2000, 1),
    "val": (200, 2),
    "val1k": (1000, 3),
}
_IMAGE_SIZES = (128, 192)  # side lengths are drawn from this range (both ends included)
_MAX_OBJECTS = 6
_MIN_VISIBLE = 0.6  # an object keeps at least this fraction of its area visible


def shapes_root(root: Optional[str] = None) -> str:
    """``root`` or ``$DETECTRON2_DATASETS`` (default "datasets"), joined with "shapes"."""
    return os.path.join(root or os.getenv("DETECTRON2_DATASETS", "datasets"), "shapes")


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
                (o["visible"] - covered[i]) >= _MIN_VISIBLE * o["area"]
                for i, o in enumerate(objects)
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
            polys = [
                c.reshape(-1).astype(float).tolist() for c in contours if cv2.contourArea(c) >= 4
            ]
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
                {
                    "id": idx + 1,
                    "file_name": file_name,
                    "height": img.shape[0],
                    "width": img.shape[1],
                }
            )
            for ann in anns:
                annotations.append({"id": len(annotations) + 1, "image_id": idx + 1, **ann})
        coco = {
            "info": {"description": f"cbam_hrnet_d2 synthetic shapes, split {split}, seed {seed}"},
            "images": images,
            "annotations": annotations,
            "categories": [
                {"id": i + 1, "name": n, "supercategory": "shape"}
                for i, n in enumerate(SHAPES_CATEGORIES)
            ],
        }
        with open(os.path.join(tmp, f"{split}.json"), "w") as f:
            json.dump(coco, f)
        for name in (split, f"{split}.json"):
            dst = os.path.join(out_dir, name)
            if os.path.isdir(dst):
                shutil.rmtree(dst)
            try:
                os.replace(os.path.join(tmp, name), dst)
            except OSError:
                if not os.path.isdir(dst):
                    raise
                # another machine's process on a shared disk moved the same split in meanwhile
                # (generation is deterministic: the same files)
                logger.info("%s was written by another process meanwhile; keeping it", dst)
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
            logger.info(
                "shapes_%s is in %s (`python -m cbam_hrnet_d2.data --force` regenerates)",
                split,
                out,
            )
