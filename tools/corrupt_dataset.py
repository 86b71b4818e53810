#!/usr/bin/env python
"""
Write a harder copy of a COCO instance-segmentation set, to measure how a model holds up on images
its training data did not look like:

    python tools/corrupt_dataset.py --json datasets/shapes/val.json \
        --images datasets/shapes/val --out datasets/shapes_val_hard
    python train_net.py --config-file configs/shapes/mask_rcnn_CBAM_HRNet_W18_FPN_shapes.yaml \
        --eval-only MODEL.WEIGHTS output/quickstart/model_final.pth \
        DATASETS.REGISTER_COCO '[["shapes_val_hard", "datasets/shapes_val_hard/val.json",
        "datasets/shapes_val_hard/images"]]' DATASETS.TEST '("shapes_val_hard",)'

Each image gets two or three of: JPEG (PIL, quality 8-40), box/Gaussian blur, Poisson-like
sensor noise, lowered contrast, a blended texture (random sinusoid gratings), opaque rectangles and
ellipses over the scene, and an anisotropic resize (1.2-1.5x along one axis). Masks are decoded,
resized and cut where occluded, then written as RLE; instances left with fewer than 16 pixels are
dropped. Boxes are the annotated ones, scaled with the image, except for the sides an occluder
moved, which become the cut mask's extent (a mask rasterised from polygons ends ~1.2 px short of
the annotated box on the right and bottom, so boxes recomputed from masks shrank every instance).
Written with PIL and numpy alone, independently of the training augmentation
(cbam_hrnet_d2/data/augment.py), so it does not test that code against itself.
"""

import argparse
import io
import json
import logging
import os

import numpy as np
import pycocotools.mask as mask_util
from detectron2.utils.logger import setup_logger
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from cbam_hrnet_d2.utils.files import atomic_write_text

logger = logging.getLogger("corrupt_dataset")

CORRUPTIONS = ("jpeg", "blur", "noise", "contrast", "texture", "occlusion", "stretch")


def _masks(ann_list, h, w):
    out = []
    for a in ann_list:
        segm = a["segmentation"]
        rle = mask_util.merge(mask_util.frPyObjects(segm, h, w)) if isinstance(segm, list) else segm
        out.append(mask_util.decode(rle).astype(bool))
    return out


def _grating(h, w, rng):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for _ in range(3):
        ang, period = rng.uniform(0, np.pi), rng.uniform(3, 30)
        wave = np.sin((xx * np.cos(ang) + yy * np.sin(ang)) * 2 * np.pi / period)
        img += wave[..., None] * rng.uniform(20, 70, 3)
    return np.clip(img + 128, 0, 255)


def _extent(mask: np.ndarray) -> np.ndarray:
    """x0, y0, x1, y1 of a mask's pixels (x1, y1 exclusive)."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)


def corrected_box(bbox, scale, mask_before: np.ndarray, mask_after: np.ndarray) -> list:
    """COCO ``bbox`` (x, y, w, h) scaled by ``scale`` (sx, sy), each side replaced by the extent of
    ``mask_after`` where occlusion moved it away from ``mask_before``'s extent."""
    x, y, w, h = bbox
    sx, sy = scale
    box = np.array([x * sx, y * sy, (x + w) * sx, (y + h) * sy])
    if mask_before.any():
        before, after = _extent(mask_before), _extent(mask_after)
        box = np.where(before == after, box, after)
    return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]


def corrupt(image: Image.Image, masks, rng: np.random.Generator):
    """(image, masks, names of the corruptions applied, (sx, sy) of the resize, masks before
    occlusion)."""
    chosen = list(rng.choice(CORRUPTIONS, size=int(rng.integers(2, 4)), replace=False))
    w0, h0 = image.size
    if "stretch" in chosen:
        w, h = image.size
        f = rng.uniform(1.2, 1.5)
        size = (round(w * f), h) if rng.random() < 0.5 else (w, round(h * f))
        image = image.resize(size, Image.BILINEAR)
        masks = [np.array(Image.fromarray(m).resize(size, Image.NEAREST)) for m in masks]
    w, h = image.size
    resized = (w / w0, h / h0)
    uncut = masks
    if "texture" in chosen:
        arr = np.asarray(image, np.float32)
        alpha = rng.uniform(0.25, 0.5)
        image = Image.fromarray((arr * (1 - alpha) + _grating(h, w, rng) * alpha).astype(np.uint8))
    if "occlusion" in chosen:
        hidden = Image.new("L", (w, h), 0)
        draw, draw_hidden = ImageDraw.Draw(image), ImageDraw.Draw(hidden)
        for _ in range(int(rng.integers(1, 4))):
            bw, bh = rng.uniform(0.15, 0.45) * w, rng.uniform(0.15, 0.45) * h
            x0, y0 = rng.uniform(-0.1 * w, w - 0.5 * bw), rng.uniform(-0.1 * h, h - 0.5 * bh)
            box = [x0, y0, x0 + bw, y0 + bh]
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape(box, fill=colour)
            (draw_hidden.ellipse if shape == draw.ellipse else draw_hidden.rectangle)(box, fill=1)
        hidden = np.asarray(hidden, bool)
        masks = [m & ~hidden for m in masks]
    if "contrast" in chosen:
        image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.25, 0.6))
    if "blur" in chosen:
        radius = rng.uniform(0.8, 2.0)
        blur = (
            ImageFilter.GaussianBlur(radius) if rng.random() < 0.5 else ImageFilter.BoxBlur(radius)
        )
        image = image.filter(blur)
    if "noise" in chosen:
        arr = np.asarray(image, np.float32)
        scale = rng.uniform(2, 8)  # photon-noise-like: variance grows with intensity
        arr = rng.poisson(np.clip(arr, 0, 255) / scale) * scale + rng.normal(0, 3, arr.shape)
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if "jpeg" in chosen:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=int(rng.integers(8, 41)))
        image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return image, masks, chosen, resized, uncut


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="COCO json of the set to corrupt")
    parser.add_argument("--images", required=True, help="its image folder")
    parser.add_argument("--out", required=True, help="writes OUT/images/*.png and OUT/val.json")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args(argv)
    setup_logger(name="corrupt_dataset")
    with open(args.json) as f:
        coco = json.load(f)
    by_image = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    rng = np.random.default_rng(args.seed)
    images, annotations, counts = [], [], dict.fromkeys(CORRUPTIONS, 0)
    for info in coco["images"]:
        anns = [a for a in by_image.get(info["id"], []) if not a.get("iscrowd", 0)]
        image = Image.open(os.path.join(args.images, info["file_name"])).convert("RGB")
        masks = _masks(anns, info["height"], info["width"])
        image, masks, chosen, scale, uncut = corrupt(image, masks, rng)
        for name in chosen:
            counts[name] += 1
        name = os.path.splitext(info["file_name"])[0] + ".png"
        image.save(os.path.join(args.out, "images", name))
        images.append(dict(info, file_name=name, width=image.size[0], height=image.size[1]))
        for a, m, before in zip(anns, masks, uncut):
            if m.sum() < 16:
                continue
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append(
                dict(
                    a,
                    id=len(annotations) + 1,
                    segmentation=rle,
                    bbox=corrected_box(a["bbox"], scale, before, m),
                    area=float(m.sum()),
                )
            )
    out = dict(coco, images=images, annotations=annotations)
    out.setdefault("info", {"description": f"{args.json} corrupted by tools/corrupt_dataset.py"})
    atomic_write_text(os.path.join(args.out, "val.json"), json.dumps(out))
    logger.info(
        "%d images, %d instances (of %d) written to %s; corruptions applied: %s",
        len(images), len(annotations), len(coco["annotations"]), args.out, counts,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
