"""Training augmentation for images harder than the ones a dataset holds (``INPUT.HARD_AUG``):
camera and codec corruptions, textured and low-contrast appearance, heavier occlusion and mildly
stretched objects, each applied to a training image with probability ``INPUT.HARD_AUG.PROB``, from
training iteration ``INPUT.HARD_AUG.START_ITER`` on (:class:`IterationGate`).

All are detectron2 augmentations, run by detectron2's ``DatasetMapper`` with the default resize and
flip. Photometric ones are ``ColorTransform``s (boxes and masks unchanged); the stretch is a
``ResizeTransform`` (boxes and masks follow); occlusion paints opaque blobs over the image and
removes the painted pixels from every instance mask, so the labels describe what is visible
(:func:`cut_instances`: a box side moves only where the occluder moved the mask's extent, and
instances left without pixels are dropped). Occlusion needs masks as pixels:
:func:`with_rle_masks` turns polygon annotations into RLE (``INPUT.MASK_FORMAT "bitmask"``).

Boxes are not recomputed from the masks wholesale (detectron2's ``recompute_boxes``): a mask
rasterised from polygons is not the annotated box's pixels (it ends about a pixel short of the json
box on the right and bottom), so every training box would shrink, whatever ``INPUT.HARD_AUG.PROB``
(measured in docs/notes/cpu-recipe.md, "The HARD_AUG cost was a box bug").

=========== ==========================================================================
corruption  parameters (each drawn per image)
=========== ==========================================================================
stretch     width x r, height / r, r^2 in [1/1.35, 1.35] (aspect ratio changed up to 1.35x)
occlusion   1-3 blobs (3-9 vertices), radius 10-30% of the short side, plain or textured
texture     a background texture of the shapes generator blended in at 20-50%
contrast    detectron2's ``RandomContrast(0.35, 0.8)``
blur        Gaussian, sigma 0.6-1.8 px
noise       Gaussian sensor noise, sigma 4-20 (of 255), per pixel and channel
jpeg        JPEG encode + decode, quality 10-60
=========== ==========================================================================
"""

import math
from functools import partial
from typing import List, Optional

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.data import transforms as T
from detectron2.data.detection_utils import filter_empty_instances
from detectron2.data.transforms import (
    Augmentation,
    ColorTransform,
    NoOpTransform,
    ResizeTransform,
)
from detectron2.structures import BitMasks, Boxes, Instances
from fvcore.transforms.transform import Transform

from cbam_hrnet_d2.data.shapes import _background

__all__ = [
    "with_hard_augmentations",
    "IterationGate",
    "with_rle_masks",
    "rle_mask_dicts",
    "OcclusionTransform",
    "cut_instances",
]


def _rng() -> np.random.Generator:
    """A generator seeded from numpy's global RNG, which detectron2 seeds per data-loader worker."""
    return np.random.default_rng(np.random.randint(2**31))


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED).reshape(img.shape)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), sigma)


def _noise(img: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _blend(img: np.ndarray, texture: np.ndarray, alpha: float) -> np.ndarray:
    return (img * (1 - alpha) + texture * alpha).astype(np.uint8)


class _Photometric(Augmentation):
    """``op(image, **params())`` as a ``ColorTransform``."""

    def __init__(self, op, params):
        super().__init__()
        self.op, self.params = op, params

    def get_transform(self, image):
        return ColorTransform(partial(self.op, **self.params(image)))


class RandomStretch(Augmentation):
    def __init__(self, max_ratio: float = 1.35):
        super().__init__()
        self.max_ratio = max_ratio

    def get_transform(self, image):
        h, w = image.shape[:2]
        r = math.sqrt(math.exp(np.random.uniform(-1, 1) * math.log(self.max_ratio)))
        return ResizeTransform(h, w, max(1, round(h / r)), max(1, round(w * r)))


_POLYGONS_CANNOT_BE_CUT = (
    "INPUT.HARD_AUG occlusion cuts instance masks, which polygons cannot express: use "
    "INPUT.MASK_FORMAT 'bitmask' with RLE annotations (augment.with_rle_masks)."
)


class OcclusionTransform(Transform):
    """Paint ``fill`` where ``occluder`` (H, W bool) is set; instance masks lose those pixels."""

    def __init__(self, occluder: np.ndarray, fill: np.ndarray):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img):
        out = img.copy()
        out[self.occluder] = self.fill[self.occluder]
        return out

    def apply_coords(self, coords):
        return coords

    def apply_polygons(self, polygons):
        raise ValueError(_POLYGONS_CANNOT_BE_CUT)

    def apply_segmentation(self, segmentation):
        return np.where(self.occluder, 0, segmentation).astype(segmentation.dtype)


def cut_instances(instances: Instances, occluders: List[np.ndarray]) -> Instances:
    """``instances`` (annotated boxes and uncut ``BitMasks``, both in image coordinates) with the
    ``occluders`` (H, W bool) cut out of every mask. Each box side stays the annotated one where the
    cut left the mask's extent on that side unchanged and becomes the cut mask's extent where it
    moved; instances without pixels left are dropped. Without masks (``MODEL.MASK_ON`` off, or no
    instances) nothing changes."""
    if not instances.has("gt_masks"):
        return instances
    if not isinstance(instances.gt_masks, BitMasks):
        raise ValueError(_POLYGONS_CANNOT_BE_CUT)
    before = instances.gt_masks.get_bounding_boxes().tensor
    masks = instances.gt_masks.tensor
    for occluder in occluders:
        masks = masks & ~torch.as_tensor(occluder, device=masks.device)
    after = BitMasks(masks).get_bounding_boxes().tensor
    boxes = instances.gt_boxes.tensor
    instances.gt_masks = BitMasks(masks)
    instances.gt_boxes = Boxes(torch.where(after == before, boxes, after))
    return filter_empty_instances(instances)


class RandomOcclusion(Augmentation):
    def get_transform(self, image):
        h, w = image.shape[:2]
        rng = _rng()
        occluder = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            k = int(rng.integers(3, 10))
            angles = np.sort(rng.uniform(0, 2 * math.pi, k))
            radius = rng.uniform(0.1, 0.3) * min(h, w) * rng.uniform(0.6, 1.0, k)
            centre = rng.uniform([0, 0], [w, h])
            pts = centre + np.stack([radius * np.cos(angles), radius * np.sin(angles)], 1)
            cv2.fillPoly(occluder, [np.round(pts).astype(np.int32)], 1)
        if rng.random() < 0.5:
            fill = _background(h, w, rng)
        else:
            fill = np.broadcast_to(rng.integers(0, 256, 3).astype(np.uint8), (h, w, 3))
        if image.ndim == 2:
            fill = fill[..., 0]
        return OcclusionTransform(occluder.astype(bool), fill)


def _texture_params(image) -> dict:
    h, w = image.shape[:2]
    texture = _background(h, w, _rng())
    texture = texture if image.ndim == 3 else texture[..., 0]
    return {"texture": texture, "alpha": np.random.uniform(0.2, 0.5)}


def _blur_params(image) -> dict:
    return {"sigma": np.random.uniform(0.6, 1.8)}


def _noise_params(image) -> dict:
    return {"sigma": np.random.uniform(4, 20), "seed": np.random.randint(2**31)}


def _jpeg_params(image) -> dict:
    return {"quality": int(np.random.randint(10, 61))}


class IterationGate(Augmentation):
    """Opens at training iteration ``start_iter``: placed first in an augmentation list, it counts
    the images its data worker maps and sets :attr:`open` for the augmentations gated by it.

    A training process's loader hands each of its ``workers`` (``max(1, DATALOADER.NUM_WORKERS)``)
    every ``workers``-th batch of ``images_per_batch`` images, so the ``n``-th image a worker maps
    belongs to iteration ``first_iteration + n * workers // images_per_batch``, exact with one
    worker and within ``workers`` iterations with more. The count is part of the data stream: an
    exact resume replays it (``DATALOADER.EXACT_RESUME``); a resume without replay sets
    :meth:`begin_at` (``ResumableLoader.begin_at``) before the workers start."""

    def __init__(self, start_iter: int, images_per_batch: int, workers: int):
        super().__init__()
        if start_iter < 0:
            raise ValueError(f"INPUT.HARD_AUG.START_ITER must be >= 0, got {start_iter!r}.")
        self.start_iter = start_iter
        self.images_per_batch = max(1, images_per_batch)
        self.workers = max(1, workers)
        self.first_iteration = 0
        self.images = 0
        self.open = start_iter == 0

    def begin_at(self, iteration: int) -> None:
        """The next image this worker maps starts training iteration ``iteration``."""
        self.first_iteration = iteration
        self.images = 0

    def iteration(self) -> int:
        """The training iteration of the next image this worker maps."""
        return self.first_iteration + self.images * self.workers // self.images_per_batch

    def __call__(self, aug_input) -> Transform:
        self.open = self.iteration() >= self.start_iter
        self.images += 1
        return NoOpTransform()

    def get_transform(self, *args) -> Transform:
        return NoOpTransform()


class _Gated(T.RandomApply):
    """detectron2's ``RandomApply`` that applies nothing while ``gate`` is closed."""

    def __init__(self, aug, prob: float, gate: IterationGate):
        super().__init__(aug, prob)
        self.gate = gate

    def __call__(self, aug_input) -> Transform:
        return super().__call__(aug_input) if self.gate.open else NoOpTransform()

    def get_transform(self, *args) -> Transform:
        return super().get_transform(*args) if self.gate.open else NoOpTransform()


def with_hard_augmentations(
    augmentations: List[Augmentation], prob: float, gate: Optional[IterationGate] = None
) -> List[Augmentation]:
    """``augmentations`` (detectron2's resize and flip) with the seven corruptions, each applied
    with probability ``prob``: the stretch before them, the rest after them (the model sees each
    corruption at the size it trains on). With ``gate``, the corruptions apply only once it is
    open (from its training iteration on); it leads the list."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"INPUT.HARD_AUG.PROB must be in [0, 1], got {prob!r}.")
    gate = gate if gate is not None else IterationGate(0, 1, 1)
    photometric = [
        RandomOcclusion(),
        _Photometric(_blend, _texture_params),
        T.RandomContrast(0.35, 0.8),
        _Photometric(_blur, _blur_params),
        _Photometric(_noise, _noise_params),
        _Photometric(_jpeg, _jpeg_params),
    ]
    apply = [_Gated(a, prob, gate) for a in photometric]
    return [gate, _Gated(RandomStretch(), prob, gate), *augmentations, *apply]


def with_rle_masks(dataset_dict: dict) -> dict:
    """A copy of ``dataset_dict`` whose polygon instance masks are RLE (one per instance)."""
    h, w = dataset_dict["height"], dataset_dict["width"]
    annotations = []
    for a in dataset_dict.get("annotations", []):
        segm = a.get("segmentation")
        if isinstance(segm, list):
            a = dict(a, segmentation=mask_util.merge(mask_util.frPyObjects(segm, h, w)))
        annotations.append(a)
    return dict(dataset_dict, annotations=annotations)


def rle_mask_dicts(dicts: List[dict]) -> List[dict]:
    """:func:`with_rle_masks` of every dataset dict."""
    return [with_rle_masks(d) for d in dicts]
