"""Dataset registration: the embedded shapes set (:mod:`cbam_hrnet_d2.shapes`), COCO-json files
(``DATASETS.REGISTER_COCO`` or :func:`register_coco_json`), the pre-flight check of a config's
datasets, and the command line (generate the shapes set, or ``--check`` registered datasets).

Importing this module registers ``shapes_train`` and ``shapes_val`` (as detectron2's ``builtin.py``
registers COCO's names); their files are generated on first use.
"""

import argparse
import logging
import os
from typing import List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.utils import comm

from .data_check import check_dataset, validate_coco_json
from .shapes import SHAPES_CATEGORIES, SHAPES_SPLITS, ensure_shapes, generate_shapes, shapes_root

__all__ = [
    "SHAPES_CATEGORIES",
    "generate_shapes",
    "register_shapes",
    "register_coco_json",
    "register_from_cfg",
    "load_coco_instances",
    "validate_coco_json",
    "check_datasets",
    "check_dataset",
]

logger = logging.getLogger(__name__)


def load_coco_instances(json_file: str, image_root: str, name: str) -> List[dict]:
    """detectron2's ``load_coco_json`` after :func:`validate_coco_json` (errors name the file and
    the entry, also when called through ``DatasetCatalog.get``), plus: instances whose segmentation
    is empty are dropped too (detectron2 keeps them without a mask, which breaks mask training),
    with one counted warning."""
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
    """Register a COCO-format instance dataset under ``name`` (loader + metadata for
    COCOEvaluator)."""
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if (
            getattr(meta, "json_file", None) == json_file
            and getattr(meta, "image_root", None) == image_root
        ):
            return
        raise ValueError(
            f"Dataset {name!r} is already registered with other files; pick another name"
        )
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
                f"DATASETS.REGISTER_COCO[{i}] = {entry!r}; each entry must be [name, json_file, "
                "image_root]"
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
        split = name[len("shapes_") :]
        if name.startswith("shapes_") and split in SHAPES_SPLITS and comm.is_main_process():
            # a user's own dataset may be named shapes_* too: only the generator's splits
            ensure_shapes(os.path.dirname(os.path.dirname(meta.json_file)), [split])
        comm.synchronize()
        for what in ("json_file", "image_root"):
            path = getattr(meta, what, None)
            if path is not None and not os.path.exists(path):
                raise FileNotFoundError(
                    f"Dataset {name!r}: {what} {path} does not exist. Datasets are looked up under "
                    "$DETECTRON2_DATASETS (now "
                    f"{os.getenv('DETECTRON2_DATASETS', 'datasets')!r}); for "
                    "COCO 2017 place coco/annotations/instances_{train,val}2017.json and "
                    "coco/{train,val}2017/ there (see datasets/README.md), for the shapes set run "
                    "`python -m cbam_hrnet_d2.data`, for other data fix DATASETS.REGISTER_COCO."
                )
        if getattr(meta, "json_file", None) and comm.is_main_process():
            validate_coco_json(meta.json_file, meta.image_root)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from detectron2.utils.logger import setup_logger

    parser = argparse.ArgumentParser(
        description="Generate the embedded shapes dataset, or check registered datasets (--check)."
    )
    parser.add_argument("--out", default=None, help="dataset root (default $DETECTRON2_DATASETS)")
    parser.add_argument(
        "--splits", nargs="+", default=list(SHAPES_SPLITS), choices=list(SHAPES_SPLITS)
    )
    parser.add_argument("--force", action="store_true", help="regenerate existing splits")
    parser.add_argument(
        "--check",
        nargs="+",
        metavar="NAME",
        help="check these registered datasets: every image decodes, its size matches the json, "
        "every box and mask is valid (shapes_*, coco_2017_*, or names of --config-file's "
        "DATASETS.REGISTER_COCO)",
    )
    parser.add_argument(
        "--config-file", default=None, help="with --check: register its DATASETS.REGISTER_COCO"
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="with --config-file: KEY VALUE overrides"
    )
    args = parser.parse_args(argv)
    setup_logger(name=logger.name)
    if args.check:
        if args.config_file:
            from .config import load_config

            register_from_cfg(load_config(args.config_file, args.opts))
        bad = 0
        for name in args.check:
            if name not in DatasetCatalog.list():
                logger.error(
                    "Dataset %r is not registered (give --config-file for DATASETS.REGISTER_COCO)",
                    name,
                )
                bad += 1
                continue
            if name.startswith("shapes_"):
                ensure_shapes(args.out, [name[len("shapes_") :]])
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


# registration at import, like detectron2's builtin datasets
register_shapes()


if __name__ == "__main__":
    raise SystemExit(main())
