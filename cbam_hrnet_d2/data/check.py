"""Checks of COCO instance files, before any training step.

* :func:`validate_coco_json`: the structure of the json (fast; run by ``train_net.py`` on every
  dataset and by the loader of every dataset registered through :mod:`cbam_hrnet_d2.data`). Raises
  on the first problem, naming the file and the entry.
* :func:`check_dataset`: everything, image by image with a progress bar: every image decodes, its
  size matches the json, every box and mask is valid. Lists all problems
  (``python -m cbam_hrnet_d2.data --check NAME``).
"""

import json
import logging
import os
from typing import Dict, List, Set, Tuple

from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from tqdm import tqdm

__all__ = ["validate_coco_json", "check_dataset", "IMAGE_ERRORS"]

logger = logging.getLogger(__name__)

# What decoding a broken image file raises: PIL's OSError ("image file is truncated", "cannot
# identify image file" for zero bytes), SyntaxError ("broken PNG file"), zlib / EOF errors; a
# missing file.
IMAGE_ERRORS = (OSError, SyntaxError, EOFError, ValueError)

# (json path, mtime, size) of files validated in this process: a dataset's loader does not parse a
# file again that train_net.py's pre-flight check has just validated.
_VALIDATED: Set[Tuple[str, int, int]] = set()


def _file_key(path: str) -> Tuple[str, int, int]:
    st = os.stat(path)
    return os.path.realpath(path), st.st_mtime_ns, st.st_size


def _load_json(json_file: str) -> dict:
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO json file {json_file} does not exist")
    try:
        with open(json_file) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_file} is not valid JSON: {e}") from e


def _is_rle(segm) -> bool:
    return isinstance(segm, dict) and "counts" in segm and "size" in segm


def _segmentation_problem(ann: dict, img: dict) -> str:
    """Why ``ann["segmentation"]`` is unusable, or "" (degenerate polygons are not a problem here:
    detectron2's loader drops them with one counted warning)."""
    segm = ann.get("segmentation")
    if segm is None or isinstance(segm, list):
        if isinstance(segm, list) and any(not isinstance(p, list) for p in segm):
            return "segmentation is a list but not a list of polygons (lists of x, y numbers)"
        return ""
    if not isinstance(segm, dict):
        return f"segmentation has type {type(segm).__name__}; expected polygons or an RLE dict"
    if not _is_rle(segm):
        return f"RLE segmentation needs 'size' and 'counts' (has {sorted(segm)})"
    size = list(segm["size"])
    if size != [img.get("height"), img.get("width")]:
        hw = [img.get("height"), img.get("width")]
        return f"RLE size {size} differs from its image's [height, width] {hw}"
    return ""


def validate_coco_json(json_file: str, image_root: str) -> None:
    """Raise ValueError naming the file and the entry for: a file that is not JSON or not a COCO
    instances file, an annotation whose category id is not in ``categories``, an annotation of an
    unknown image, a malformed segmentation (an RLE whose size is not its image's), an image without
    height/width; FileNotFoundError for an image file that does not exist. ``info`` and ``licenses``
    are optional. (Degenerate polygons are dropped by detectron2's loader with one warning that
    counts them; image sizes are checked against the files when images are read.)"""
    key = _file_key(json_file) if os.path.isfile(json_file) else None
    if key in _VALIDATED:
        return
    _validate(_load_json(json_file), json_file, image_root)
    if key is not None:
        _VALIDATED.add(key)


def _validate(data, json_file: str, image_root: str) -> None:
    """:func:`validate_coco_json` on the already parsed ``data`` of ``json_file``."""
    if not isinstance(data, dict):
        raise ValueError(
            f"{json_file} is not a COCO instances file: the top level is not an object"
        )
    for k in ("images", "annotations", "categories"):
        if not isinstance(data.get(k), list):
            raise ValueError(f"{json_file} is not a COCO instances file: no '{k}' list")
    cat_ids = {c["id"] for c in data["categories"]}
    images = {img["id"]: img for img in data["images"]}
    for img in data["images"]:
        if not all(isinstance(img.get(k), (int, float)) for k in ("height", "width")):
            raise ValueError(
                f"{json_file}: image id {img.get('id')} has no numeric 'height' and 'width'"
            )
        if not isinstance(img.get("file_name"), str):
            raise ValueError(f"{json_file}: image id {img.get('id')} has no 'file_name'")
    for ann in data["annotations"]:
        if ann.get("category_id") not in cat_ids:
            raise ValueError(
                f"{json_file}: annotation id {ann.get('id')} has category_id "
                f"{ann.get('category_id')}, which is not in 'categories' (ids {sorted(cat_ids)})"
            )
        if ann.get("image_id") not in images:
            raise ValueError(
                f"{json_file}: annotation id {ann.get('id')} names unknown image_id "
                f"{ann.get('image_id')}"
            )
        problem = _segmentation_problem(ann, images[ann["image_id"]])
        if problem:
            raise ValueError(f"{json_file}: annotation id {ann.get('id')}: {problem}")
    for img in data["images"]:
        path = os.path.join(image_root, img["file_name"])
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{json_file}: image id {img['id']} names {path}, which does not exist"
            )


def _box_problem(ann: dict, img: dict) -> str:
    bbox = ann.get("bbox")
    if not (
        isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)
    ):
        return f"bbox {bbox!r} is not [x, y, width, height]"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"bbox {bbox} has no area"
    if x >= img["width"] or y >= img["height"] or x + w <= 0 or y + h <= 0:
        return f"bbox {bbox} lies outside its {img['width']}x{img['height']} image"
    return ""


def check_dataset(name: str) -> List[str]:
    """Check a registered COCO-json dataset completely (see module doc), with a progress bar.

    Returns:
        list[str]: one line per problem (empty: the dataset is fine), each naming the file.
    """
    meta = MetadataCatalog.get(name)
    json_file, image_root = getattr(meta, "json_file", None), getattr(meta, "image_root", None)
    if not json_file:
        raise ValueError(
            f"Dataset {name!r} has no json_file in its metadata: only COCO-json datasets can be "
            "checked"
        )
    data = _load_json(json_file)  # parsed once: structure, then every image
    problems: List[str] = []
    try:
        _validate(data, json_file, image_root)
    except (ValueError, FileNotFoundError) as e:
        problems.append(str(e))  # go on: list every bad image and annotation, not only the first
    anns_of: Dict[int, List[dict]] = {}
    for ann in data.get("annotations", []):
        anns_of.setdefault(ann.get("image_id"), []).append(ann)
    for img in tqdm(data.get("images", []), desc=f"checking {name}", unit="img", mininterval=1.0):
        path = os.path.join(image_root, img["file_name"])
        try:
            pixels = read_image(path, format="BGR")
            if pixels.shape[:2] != (img.get("height"), img.get("width")):
                problems.append(
                    f"{path}: decoded size {pixels.shape[1]}x{pixels.shape[0]} (WxH) differs from "
                    f"the json's {img.get('width')}x{img.get('height')} (image id {img['id']})"
                )
        except IMAGE_ERRORS as e:
            problems.append(
                f"{path}: does not decode ({type(e).__name__}: {e}) (image id {img['id']})"
            )
        for ann in anns_of.get(img["id"], []):
            why = _box_problem(ann, img) or _segmentation_problem(ann, img)
            if why:
                problems.append(f"{json_file}: annotation id {ann.get('id')} of {path}: {why}")
    return problems
