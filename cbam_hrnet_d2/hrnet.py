"""HRNet trunk (Wang et al., "Deep High-Resolution Representation Learning for Visual Recognition",
TPAMI 2020) built from timm's ``HighResolutionNet`` with ``feature_location=''``: the four stage-4
branches, no classifier and no ``incre`` / final layers.

The per-width architecture table is timm's ``cfg_cls`` (data); this module only selects from it and
owns what timm does not: feature names, strides, norm choice and stage-wise freezing.
"""
from typing import Dict, List, Tuple

import timm
from detectron2.layers import FrozenBatchNorm2d, get_norm
from timm.models.hrnet import cfg_cls
from torch import nn

__all__ = [
    "HRNET_FEATURES",
    "HRNET_STRIDES",
    "HRNET_WIDTHS",
    "HRNET_NORMS",
    "HRNET_STAGES",
    "hrnet_branch_channels",
    "build_hrnet_trunk",
    "freeze_hrnet_stages",
]

# Feature names carry log2(stride), like detectron2's res2..res5; FPN turns them into p2..p5.
HRNET_FEATURES: Tuple[str, ...] = ("hr2", "hr3", "hr4", "hr5")
HRNET_STRIDES: Tuple[int, ...] = (4, 8, 16, 32)
# MODEL.HRNET.WIDTH -> timm architecture name (its cfg_cls entry is the width table).
HRNET_WIDTHS: Dict[int, str] = {18: "hrnet_w18", 32: "hrnet_w32", 48: "hrnet_w48"}
HRNET_NORMS: Tuple[str, ...] = ("BN", "SyncBN", "FrozenBN", "GN")
# Module groups of the timm trunk in forward order; MODEL.BACKBONE.FREEZE_AT=k freezes the first k.
HRNET_STAGES: Tuple[Tuple[str, ...], ...] = (
    ("conv1", "bn1", "conv2", "bn2"),  # 1: stem
    ("layer1",),  # 2: stage 1
    ("transition1", "stage2"),  # 3: stage 2
    ("transition2", "stage3"),  # 4: stage 3
    ("transition3", "stage4"),  # 5: stage 4
)


def hrnet_branch_channels(width: int) -> List[int]:
    """
    Args:
        width (int): HRNet width W (18, 32 or 48).

    Returns:
        list[int]: channels of the four stage-4 branches, e.g. [18, 36, 72, 144] for W18.
    """
    stage4 = cfg_cls[HRNET_WIDTHS[width]]["stage4"]
    expansion = 4 if stage4["block_type"] == "BOTTLENECK" else 1
    return [c * expansion for c in stage4["num_channels"]]


def _group_norm(channels: int) -> nn.GroupNorm:
    # HRNet branch widths (18, 36, ...) are not multiples of 32: use the most groups <= 32 that divide C.
    groups = max(g for g in range(1, 33) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def _make_norm(norm: str, channels: int) -> nn.Module:
    if norm == "GN":
        return _group_norm(channels)
    return get_norm(norm, channels)


def _replace_batchnorm(module: nn.Module, norm: str) -> None:
    """Replace every nn.BatchNorm2d below ``module`` by ``norm`` (detectron2 name or naiveSyncBN)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, _make_norm(norm, child.num_features))
        else:
            _replace_batchnorm(child, norm)


def build_hrnet_trunk(width: int, *, in_channels: int = 3, norm: str = "BN") -> nn.Module:
    """
    Args:
        width (int): one of :data:`HRNET_WIDTHS`.
        in_channels (int): input image channels.
        norm (str): "BN" keeps timm's BatchNorm2d; otherwise any name detectron2's ``get_norm``
            takes ("SyncBN", "naiveSyncBN", "FrozenBN") or "GN".

    Returns:
        nn.Module: timm ``HighResolutionNetFeatures`` whose forward maps (N, C, H, W) to the list of
        four branch tensors at strides 4, 8, 16, 32.
    """
    trunk = timm.create_model(
        HRNET_WIDTHS[width],
        pretrained=False,
        features_only=True,
        feature_location="",
        out_indices=(1, 2, 3, 4),
        in_chans=in_channels,
    )
    if norm != "BN":
        _replace_batchnorm(trunk, norm)
    return trunk


def freeze_hrnet_stages(trunk: nn.Module, freeze_at: int) -> None:
    """Freeze the first ``freeze_at`` groups of :data:`HRNET_STAGES`: parameters stop requiring
    grad and their BatchNorms become FrozenBatchNorm2d (as detectron2's ``CNNBlockBase.freeze``).
    """
    for group in HRNET_STAGES[:freeze_at]:
        for name in group:
            module = getattr(trunk, name)
            for p in module.parameters():
                p.requires_grad = False
            setattr(trunk, name, FrozenBatchNorm2d.convert_frozen_batchnorm(module))

