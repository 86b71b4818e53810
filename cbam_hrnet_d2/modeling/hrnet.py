"""HRNet trunk (Wang et al., "Deep High-Resolution Representation Learning for Visual Recognition",
TPAMI 2020) built from timm's ``HighResolutionNet`` with ``feature_location=''``: the four stage-4
branches, no classifier and no ``incre`` / final layers.

The per-width architecture table is timm's ``cfg_cls`` (data); this module only selects from it and
owns what timm does not: feature names, strides, norm choice, stage-wise freezing and activation
checkpointing of the stage modules.
"""

from typing import Dict, List, Tuple

import timm
import torch
from detectron2.layers import FrozenBatchNorm2d, get_norm
from timm.models.hrnet import HighResolutionModule, cfg_cls
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

__all__ = [
    "HRNET_FEATURES",
    "HRNET_STRIDES",
    "HRNET_WIDTHS",
    "HRNET_NORMS",
    "HRNET_STAGES",
    "hrnet_branch_channels",
    "build_hrnet_trunk",
    "freeze_hrnet_stages",
    "STATELESS_NORMS",
    "recompute_hrnet_modules",
]

# Feature names carry log2(stride), like detectron2's res2..res5; FPN turns them into p2..p5.
HRNET_FEATURES: Tuple[str, ...] = ("hr2", "hr3", "hr4", "hr5")
HRNET_STRIDES: Tuple[int, ...] = (4, 8, 16, 32)
# MODEL.CBAM_HRNET.WIDTH -> timm architecture name (its cfg_cls entry is the width table).
HRNET_WIDTHS: Dict[int, str] = {18: "hrnet_w18", 32: "hrnet_w32", 48: "hrnet_w48"}
HRNET_NORMS: Tuple[str, ...] = ("BN", "SyncBN", "FrozenBN", "GN")
# Norms whose training-mode forward changes no state, so running a module's forward twice
# (activation checkpointing) gives the same result and leaves the model as one forward would.
STATELESS_NORMS: Tuple[str, ...] = ("FrozenBN", "GN")
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
    # HRNet branch widths (18, 36, ...) are not multiples of 32: use the most groups <= 32 that
    # divide C.
    groups = max(g for g in range(1, 33) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def _make_norm(norm: str, channels: int) -> nn.Module:
    if norm == "GN":
        return _group_norm(channels)
    return get_norm(norm, channels)


def _replace_batchnorm(module: nn.Module, norm: str) -> None:
    """Replace every nn.BatchNorm2d below ``module`` by ``norm`` (detectron2 name or
    naiveSyncBN)."""
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


class _RecomputedHRModule(HighResolutionModule):
    """timm's ``HighResolutionModule`` that, when training with autograd, keeps only its inputs for
    backward and runs its forward again there (``torch.utils.checkpoint``, non-reentrant)."""

    def forward(self, x: List[torch.Tensor]) -> List[torch.Tensor]:
        if self.training and torch.is_grad_enabled():
            # timm's forward writes its branch outputs into the list it is given: hand each run
            # (forward and recomputation) a fresh list of the same input tensors
            run = super().forward
            return checkpoint(lambda *inputs: run(list(inputs)), *x, use_reentrant=False)
        return super().forward(x)


def recompute_hrnet_modules(trunk: nn.Module) -> Tuple[int, List[str]]:
    """Activation checkpointing (``MODEL.CBAM_HRNET.ACTIVATION_CHECKPOINTING``): every stage-2..4
    ``HighResolutionModule`` of ``trunk`` whose norms are stateless recomputes its forward in
    backward instead of keeping its activations. A module holding a BatchNorm that is not frozen is
    left as it is: in training mode it would update its running statistics twice per step.

    The module's class is swapped rather than the module wrapped (detectron2's ``vit.py`` wraps its
    blocks with ``checkpoint_wrapper``): parameters, buffers and state_dict keys stay, so
    checkpoints load with the option on or off; and timm's forward writes into its input list, which
    a generic wrapper would hand to the recomputation already overwritten.

    Returns:
        (int, list[str]): the number of modules changed, and the names of those left unchanged.
    """
    count, skipped = 0, []
    for name, module in trunk.named_modules():
        if type(module) is not HighResolutionModule:
            continue
        if any(isinstance(m, _BatchNorm) for m in module.modules()):
            skipped.append(name)
            continue
        module.__class__ = _RecomputedHRModule
        count += 1
    return count, skipped
