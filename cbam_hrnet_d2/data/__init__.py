"""Data: dataset registration (:mod:`.datasets`; importing registers ``shapes_train`` /
``shapes_val``), the embedded shapes generator (:mod:`.shapes`), dataset checks (:mod:`.check`),
the loaders (:mod:`.build`) and the hard augmentation (:mod:`.augment`).
``python -m cbam_hrnet_d2.data`` generates the shapes set or checks datasets (``--check``)."""

from cbam_hrnet_d2.data.check import check_dataset, validate_coco_json
from cbam_hrnet_d2.data.datasets import (
    check_datasets,
    load_coco_instances,
    register_coco_json,
    register_from_cfg,
    register_shapes,
)
from cbam_hrnet_d2.data.shapes import SHAPES_CATEGORIES, generate_shapes

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
