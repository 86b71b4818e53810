"""Training and test data loaders: detectron2's, with a mask format chosen for the data and bad
images named (and, in training, skipped).

* **Mask format.** detectron2 trains polygon masks by default (``INPUT.MASK_FORMAT "polygon"``) and
  fails at the first batch on RLE masks (what mask-based labelling tools export). When a training
  set holds RLE masks (crowd regions aside), the loader uses ``"bitmask"`` for it, which reads
  polygons and RLE alike, and logs that it did.
* **Bad images.** An image that does not decode (truncated, zero bytes, unreadable, missing) or
  whose size differs from its json entry is, in training, skipped with a warning naming its dataset
  and path; detectron2 then draws another image in its place. Each one is appended to
  ``OUTPUT_DIR/bad_images.tsv`` and :class:`cbam_hrnet_d2.engine.hooks.BadImageCounter` puts
  their number into metrics.json (``data/bad_images``). In evaluation a bad image stops the run
  with the same message (skipping it would change the AP). ``python -m cbam_hrnet_d2.data --check
  NAME`` finds them all before training.
* **Signals in workers.** Data-loader workers turn SIGTERM into the clean exit PyTorch gives them on
  SIGINT, so a preemption signal sent to the whole process group stops them without a crash report
  while the trainer saves its checkpoint (:mod:`cbam_hrnet_d2.engine.preemption`).
"""

import logging
import os
import signal
from typing import List, Optional, Sequence

import torch
from detectron2.data import (
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data.detection_utils import build_augmentation
from detectron2.data.transforms import TransformList
from detectron2.utils import comm

from cbam_hrnet_d2.data.augment import (
    IterationGate,
    OcclusionTransform,
    cut_instances,
    rle_mask_dicts,
    with_hard_augmentations,
)
from cbam_hrnet_d2.data.check import IMAGE_ERRORS

__all__ = [
    "BadImageError",
    "RobustDatasetMapper",
    "build_train_loader",
    "build_test_loader",
    "choose_mask_format",
    "BAD_IMAGES_FILE",
]

logger = logging.getLogger(__name__)

BAD_IMAGES_FILE = "bad_images.tsv"


class BadImageError(RuntimeError):
    """An image of a dataset could not be used; the message names the dataset and the file."""


def _dataset_of(path: str, dataset_names: Sequence[str]) -> str:
    for name in dataset_names:
        root = getattr(MetadataCatalog.get(name), "image_root", None)
        if root and os.path.abspath(path).startswith(os.path.abspath(root) + os.sep):
            return name
    return "/".join(dataset_names) or "?"


_worker_signals_set = False


def _workers_exit_cleanly_on_sigterm() -> None:
    """In a data-loader worker: SIGTERM and SIGINT raise KeyboardInterrupt, which PyTorch's worker
    loop turns into a clean exit, instead of killing the worker (and with it the trainer's next
    fetch) or running the trainer's preemption handler that a forked worker inherits."""
    global _worker_signals_set
    if not _worker_signals_set and torch.utils.data.get_worker_info() is not None:
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _worker_signals_set = True


class RobustDatasetMapper(DatasetMapper):
    """detectron2's :class:`DatasetMapper`; an image that cannot be used raises
    :class:`BadImageError` naming its dataset and path, or, with ``skip_bad_images``, is logged,
    recorded and skipped (``None``: detectron2's dataset then maps another image)."""

    def __init__(
        self,
        *args,
        dataset_names: Sequence[str] = (),
        skip_bad_images: bool = False,
        bad_images_file: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        # one name (a LazyConfig's dataset.names) or several
        names = [dataset_names] if isinstance(dataset_names, str) else dataset_names
        self.dataset_names = list(names)
        self.skip_bad_images = skip_bad_images
        self.bad_images_file = bad_images_file

    def __call__(self, dataset_dict):
        _workers_exit_cleanly_on_sigterm()
        try:
            return super().__call__(dataset_dict)
        except IMAGE_ERRORS as e:
            path = dataset_dict.get("file_name", "?")
            dataset = _dataset_of(path, self.dataset_names)
            why = f"{type(e).__name__}: {e}"
            if not self.skip_bad_images:
                raise BadImageError(
                    f"Dataset {dataset!r}: image {path} cannot be used ({why}). Fix or remove it; "
                    f"`python -m cbam_hrnet_d2.data --check {dataset}` lists every such image."
                ) from e
            logger.warning("Dataset %r: skipping image %s (%s)", dataset, path, why)
            if self.bad_images_file:
                line = "\t".join((dataset, path, why.replace("\t", " ").replace("\n", " "))) + "\n"
                # O_APPEND: whole lines from every worker
                with open(self.bad_images_file, "a") as f:
                    f.write(line)
            return None

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        # INPUT.HARD_AUG occlusion: detectron2 maps the annotations without it (annotated boxes,
        # uncut masks), then cut_instances cuts the masks and moves only the box sides it changed
        cut = [t for t in transforms if isinstance(t, OcclusionTransform)]
        if not cut:
            return super()._transform_annotations(dataset_dict, transforms, image_shape)
        rest = TransformList([t for t in transforms if not isinstance(t, OcclusionTransform)])
        super()._transform_annotations(dataset_dict, rest, image_shape)
        occluders = [t.occluder for t in cut]
        dataset_dict["instances"] = cut_instances(dataset_dict["instances"], occluders)


def choose_mask_format(cfg, dataset_dicts: List[dict]):
    """``cfg``, or a copy with ``INPUT.MASK_FORMAT "bitmask"`` when the data hold RLE masks of
    non-crowd instances and the config asks for polygons."""
    if not cfg.MODEL.MASK_ON or cfg.INPUT.MASK_FORMAT != "polygon":
        return cfg
    rle = sum(
        1
        for d in dataset_dicts
        for a in d.get("annotations", [])
        if not a.get("iscrowd", 0) and isinstance(a.get("segmentation"), dict)
    )
    if not rle:
        return cfg
    logger.warning(
        "%s: %d instance masks are RLE, which INPUT.MASK_FORMAT 'polygon' cannot train on; using "
        "INPUT.MASK_FORMAT 'bitmask' (reads polygons and RLE). Set it in the config to silence "
        "this.",
        "/".join(cfg.DATASETS.TRAIN),
        rle,
    )
    cfg = cfg.clone()
    cfg.defrost()
    cfg.INPUT.MASK_FORMAT = "bitmask"
    cfg.freeze()
    return cfg


def build_train_loader(cfg):
    """detectron2's training loader over ``cfg.DATASETS.TRAIN`` with :func:`choose_mask_format`, a
    :class:`RobustDatasetMapper` that skips bad images (recorded in ``OUTPUT_DIR/bad_images.tsv``)
    and, with ``INPUT.HARD_AUG.ENABLED``, the augmentations of :mod:`cbam_hrnet_d2.data.augment`."""
    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
        if cfg.MODEL.KEYPOINT_ON
        else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    extra, gates = {}, []
    if cfg.INPUT.HARD_AUG.ENABLED:
        # occlusion cuts instance masks: they travel as RLE (bitmask format); the mapper moves the
        # box sides that a cut moved (augment.cut_instances), the others stay the annotated ones
        dicts = rle_mask_dicts(dicts)
        gate = IterationGate(
            cfg.INPUT.HARD_AUG.START_ITER,
            cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size(),
            cfg.DATALOADER.NUM_WORKERS,
        )
        augs = with_hard_augmentations(build_augmentation(cfg, True), cfg.INPUT.HARD_AUG.PROB, gate)
        extra = {"augmentations": augs}
        gates.append(gate)
    cfg = choose_mask_format(cfg, dicts)
    bad_file = os.path.join(cfg.OUTPUT_DIR, BAD_IMAGES_FILE) if cfg.OUTPUT_DIR else None
    mapper = RobustDatasetMapper(
        cfg,
        True,
        dataset_names=cfg.DATASETS.TRAIN,
        skip_bad_images=True,
        bad_images_file=bad_file,
        **extra,
    )
    loader = build_detection_train_loader(cfg, mapper=mapper, dataset=dicts)
    # told the iteration of the stream's first batch by ResumableLoader.begin_at
    loader.iteration_gates = gates
    return loader


def build_test_loader(cfg, dataset_name: str):
    """detectron2's test loader; a bad image stops evaluation with :class:`BadImageError`."""
    mapper = RobustDatasetMapper(cfg, False, dataset_names=[dataset_name])
    return build_detection_test_loader(cfg, dataset_name, mapper=mapper)
