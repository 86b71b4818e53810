"""ImageNet HRNet weights -> this project's backbone.

Reads a timm HRNet checkpoint (``.pth`` or ``.safetensors``: the state dict of
``timm.create_model('hrnet_w18', pretrained=True)``) or an official HRNet-Image-Classification
checkpoint (``hrnetv2_w18_imagenet_pretrained.pth``), drops the classifier and the ``incre`` /
``downsamp`` / ``final_layer`` head, and names the trunk tensors as the backbone holds them.

    python tools/convert_hrnet_weights.py --src hrnet_w18.safetensors \
        --out weights/hrnet_w18_in1k_d2.safetensors --width 18

The output loads with ``MODEL.WEIGHTS`` (detectron2's checkpointer); the source file itself can be
given to ``MODEL.CBAM_HRNET.PRETRAINED``.
"""

import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from cbam_hrnet_d2.checkpoint.checkpointer import load_tensor_file
from cbam_hrnet_d2.modeling.hrnet import HRNET_STAGES, build_hrnet_trunk
from cbam_hrnet_d2.utils.files import atomic_write

__all__ = [
    "D2_TRUNK_PREFIX",
    "read_hrnet_state_dict",
    "match_trunk_state_dict",
    "load_pretrained_trunk",
    "convert_hrnet_weights",
    "summarise_keys",
]

logger = logging.getLogger(__name__)

# Where the trunk sits in a GeneralizedRCNN with build_cbam_hrnet_fpn_backbone.
D2_TRUNK_PREFIX = "backbone.bottom_up.trunk."
_TRUNK_MODULES = {m for group in HRNET_STAGES for m in group}
# a tensor whose first dimension is the width W (channels of the highest-resolution branch)
_WIDTH_PROBE = "stage4.0.branches.0.0.conv1.weight"


def read_hrnet_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Tensors of a timm / official / converted HRNet file, with wrapper prefixes removed
    (``state_dict``/``model`` nesting, ``module.``, ``model.``, :data:`D2_TRUNK_PREFIX`)."""
    data = load_tensor_file(path)
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not data:
        raise ValueError(
            f"{path}: not a checkpoint (expected a dict of tensors, got {type(data).__name__})"
        )
    out = {}
    for k, v in data.items():
        for prefix in (D2_TRUNK_PREFIX, "module.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        if hasattr(v, "shape"):
            out[k] = torch.as_tensor(v)
    return out


def _file_width(state: Dict[str, torch.Tensor]) -> Optional[int]:
    t = state.get(_WIDTH_PROBE)
    return int(t.shape[0]) if t is not None else None


def match_trunk_state_dict(
    state: Dict[str, torch.Tensor], trunk: nn.Module, width: int, path: str
) -> Tuple[Dict[str, torch.Tensor], List[str], List[str]]:
    """Select the tensors of ``state`` that the trunk holds, checking architecture and width.

    Returns:
        (matched state dict, trunk keys missing from the file, file keys not used)
    Raises:
        ValueError naming the file and both widths / architectures on any mismatch.
    """
    expected = trunk.state_dict()
    in_trunk = {k: v for k, v in state.items() if k.split(".")[0] in _TRUNK_MODULES}
    if _WIDTH_PROBE not in in_trunk:
        sample = ", ".join(list(state)[:3])
        raise ValueError(
            f"{path} is not an HRNet checkpoint: none of its {len(state)} tensors ({sample}, ...) "
            f"is an HRNet-W{width} trunk tensor (MODEL.CBAM_HRNET.WIDTH = {width})"
        )
    file_width = _file_width(in_trunk)
    if file_width != width:
        raise ValueError(
            f"{path} holds HRNet-W{file_width} weights but the config builds HRNet-W{width} "
            f"(MODEL.CBAM_HRNET.WIDTH = {width}): convert or choose the file of width {width}, or "
            f"set MODEL.CBAM_HRNET.WIDTH = {file_width}"
        )
    bad = [k for k, v in in_trunk.items() if k in expected and v.shape != expected[k].shape]
    if bad:
        raise ValueError(
            f"{path}: {len(bad)} tensors do not fit HRNet-W{width}, e.g. {bad[0]} "
            f"{tuple(in_trunk[bad[0]].shape)} vs {tuple(expected[bad[0]].shape)}"
        )
    matched = {k: v for k, v in in_trunk.items() if k in expected}
    missing = [k for k in expected if k not in matched and not k.endswith("num_batches_tracked")]
    unused = [k for k in state if k not in matched]
    return matched, missing, unused


def summarise_keys(keys: Sequence[str]) -> str:
    groups: Dict[str, int] = {}
    for k in keys:
        groups[k.split(".")[0]] = groups.get(k.split(".")[0], 0) + 1
    return ", ".join(f"{g} ({n})" for g, n in groups.items()) or "none"


def load_pretrained_trunk(trunk: nn.Module, path: str, width: int) -> None:
    """Load ImageNet weights from ``path`` into ``trunk`` (MODEL.CBAM_HRNET.PRETRAINED) and log a
    report."""
    matched, missing, unused = match_trunk_state_dict(
        read_hrnet_state_dict(path), trunk, width, path
    )
    incompatible = trunk.load_state_dict(matched, strict=False)
    missing = [k for k in incompatible.missing_keys if not k.endswith("num_batches_tracked")]
    logger.info(
        "Loaded HRNet-W%d weights from %s: %d trunk tensors loaded; not in the file: %s; in the "
        "file but unused: %s. CBAM, FPN and the detection heads start from random init.",
        width,
        path,
        len(matched),
        summarise_keys(missing),
        summarise_keys(unused),
    )


def convert_hrnet_weights(src: str, out: str, width: int) -> Dict[str, List[str]]:
    """Write ``out`` (.safetensors, or .pth/.pkl as a detectron2 checkpoint dict) with the trunk
    tensors of ``src`` under :data:`D2_TRUNK_PREFIX`. Returns the load report."""
    trunk = build_hrnet_trunk(width)
    matched, missing, unused = match_trunk_state_dict(read_hrnet_state_dict(src), trunk, width, src)
    tensors = {D2_TRUNK_PREFIX + k: v.contiguous() for k, v in matched.items()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if out.endswith(".safetensors"):
        from safetensors.torch import save

        meta = {"source": os.path.basename(src), "width": str(width)}
        atomic_write(out, lambda f: f.write(save(tensors, metadata=meta)))
    else:
        atomic_write(
            out, lambda f: torch.save({"model": tensors, "__author__": "cbam_hrnet_d2"}, f)
        )
    return {"loaded": list(matched), "missing": missing, "unused": unused}
