"""Detectron2 backbones: HRNet trunk + CBAM (``build_cbam_hrnet_backbone``) and that + FPN
(``build_cbam_hrnet_fpn_backbone``). Both are registered in ``BACKBONE_REGISTRY``."""

import logging
from typing import Dict, Sequence

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from torch import nn

from cbam_hrnet_d2.device import is_exporting, trunk_norm, warn_if_emulated_bf16
from cbam_hrnet_d2.modeling.cbam import CBAM
from cbam_hrnet_d2.modeling.hrnet import (
    HRNET_FEATURES,
    HRNET_NORMS,
    HRNET_STAGES,
    HRNET_STRIDES,
    HRNET_WIDTHS,
    build_hrnet_trunk,
    freeze_hrnet_stages,
    recompute_hrnet_modules,
)
from cbam_hrnet_d2.modeling.hrnet_weights import load_pretrained_trunk
from cbam_hrnet_d2.modeling.precision import (
    PRECISIONS,
    autocast_dtype,
    check_precision,
    run_autocast,
)

__all__ = [
    "CBAMHRNet",
    "HRNetFPN",
    "CBAMFPN",
    "hrnet_fpn",
    "build_cbam_hrnet_backbone",
    "build_cbam_hrnet_fpn_backbone",
]

logger = logging.getLogger(__name__)

CBAM_POSITIONS = ("branches", "fpn")


class CBAMHRNet(Backbone):
    """HRNet trunk whose four stage-4 branches (hr2..hr5, strides 4/8/16/32) each optionally pass
    through a :class:`CBAM` block (Woo et al., ECCV 2018)."""

    def __init__(
        self,
        width: int,
        *,
        in_channels: int = 3,
        norm: str = "BN",
        cbam_branches: Sequence[str] = HRNET_FEATURES,
        cbam_reduction: int = 16,
        cbam_kernel_size: int = 7,
        freeze_at: int = 0,
        activation_checkpointing: bool = False,
        cpu_channels_last: bool = True,
    ):
        """
        Args:
            width (int): HRNet width, a key of :data:`HRNET_WIDTHS`.
            in_channels (int): input image channels.
            norm (str): trunk norm (see :func:`build_hrnet_trunk`).
            cbam_branches (list[str]): branches that get a CBAM block (empty = none).
            cbam_reduction (int): CBAM channel MLP reduction ratio.
            cbam_kernel_size (int): CBAM spatial conv kernel size.
            freeze_at (int): freeze the stem (1), + stage1 (2), ... (5 = whole trunk); 0 = nothing.
            activation_checkpointing (bool): in training, recompute each stage-2..4 HRNet module in
                backward instead of keeping its activations (:func:`recompute_hrnet_modules`;
                modules with a BatchNorm that is not frozen are left out, with one log line).
            cpu_channels_last (bool): on a CPU input, run the trunk channels-last (NHWC, oneDNN's
                fast layout; the FPN and heads follow it). Decided per call from the input's
                device, so a model moved with ``.to()`` runs what its new device should.
        """
        super().__init__()
        _check_trunk_args(width, norm, cbam_branches, freeze_at)
        self.trunk = build_hrnet_trunk(width, in_channels=in_channels, norm=norm)
        # names and strides are ours (hr2..hr5 at 4..32); channels and strides as timm reports them
        info = self.trunk.feature_info
        assert tuple(info.reduction()) == HRNET_STRIDES, info.reduction()
        self._out_features = list(HRNET_FEATURES)
        self._out_feature_channels = dict(zip(HRNET_FEATURES, info.channels()))
        self._out_feature_strides = dict(zip(HRNET_FEATURES, HRNET_STRIDES))
        self.cbam = nn.ModuleDict(
            {
                name: CBAM(self._out_feature_channels[name], cbam_reduction, cbam_kernel_size)
                for name in cbam_branches
            }
        )
        self.freeze(freeze_at)
        self.cpu_channels_last = cpu_channels_last
        if activation_checkpointing:
            _, skipped = recompute_hrnet_modules(self.trunk)
            if skipped:
                logger.info(
                    "Activation checkpointing is not applied to %d HRNet module(s) with "
                    "BatchNorm (%s, ...): a BatchNorm in training mode would update its "
                    "statistics twice per step (MODEL.CBAM_HRNET.NORM FrozenBN or GN, or freeze "
                    "those stages, to apply it)",
                    len(skipped),
                    skipped[0],
                )

    @property
    def size_divisibility(self) -> int:
        # The fuse layers upsample by fixed powers of two: inputs must be multiples of 32.
        return HRNET_STRIDES[-1]

    def freeze(self, freeze_at: int = 0) -> "CBAMHRNet":
        """Freeze the first ``freeze_at`` trunk stages (see :data:`HRNET_STAGES`); frozen norms
        become FrozenBatchNorm2d. Returns self."""
        freeze_hrnet_stages(self.trunk, freeze_at)
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x (Tensor): (N, C, H, W) with H, W multiples of :attr:`size_divisibility`.

        Returns:
            dict[str->Tensor]: hr2..hr5, each (N, C_i, H / s_i, W / s_i).
        """
        assert x.dim() == 4, (
            f"CBAMHRNet takes an input of shape (N, C, H, W). Got {x.shape} instead!"
        )
        # the CPU choices, per call from the input's device (graph capture: the plain trunk)
        on_cpu = x.device.type == "cpu" and not is_exporting()
        if on_cpu and self.cpu_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.trunk(x)
        outputs = {}
        for name, feature in zip(HRNET_FEATURES, features):
            if name in self.cbam:
                feature = self.cbam[name](feature)
            outputs[name] = feature
        return outputs


class HRNetFPN(FPN):
    """detectron2's :class:`FPN` that runs in ``precision`` (:mod:`.precision`, ``TEST.PRECISION``)
    in eval mode: bottom-up network and FPN under autocast, outputs cast back to float32."""

    def __init__(self, *, precision: str = "fp32", **fpn_kwargs):
        """
        Args:
            precision (str): "fp32", "bf16", "fp16" (CUDA) or "auto"; see :mod:`.precision`.
            fpn_kwargs: arguments of :class:`FPN`.
        """
        super().__init__(**fpn_kwargs)
        _check_choice("precision (TEST.PRECISION)", precision, PRECISIONS)
        self.precision = precision
        self._warned_emulated = False

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        dtype = None if self.training else autocast_dtype(self.precision, x)
        if dtype == torch.bfloat16 and not self._warned_emulated:
            # once per model: "bf16" asked for on a CPU that emulates it ("auto" never picks it)
            warn_if_emulated_bf16(f"TEST.PRECISION = {self.precision!r}", x.device)
            self._warned_emulated = True
        return run_autocast(self.features, x, dtype)

    def features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The FPN's outputs, in the caller's precision."""
        return super().forward(x)


class CBAMFPN(HRNetFPN):
    """:class:`HRNetFPN` with one :class:`CBAM` block on each output (p2..p6)."""

    def __init__(self, *, cbam_reduction: int = 16, cbam_kernel_size: int = 7, **fpn_kwargs):
        """
        Args:
            cbam_reduction, cbam_kernel_size: as in :class:`CBAM`.
            fpn_kwargs: arguments of :class:`HRNetFPN`.
        """
        super().__init__(**fpn_kwargs)
        self.cbam = nn.ModuleDict(
            {
                name: CBAM(self._out_feature_channels[name], cbam_reduction, cbam_kernel_size)
                for name in self._out_features
            }
        )

    def features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {name: self.cbam[name](f) for name, f in super().features(x).items()}


def hrnet_fpn(
    *,
    bottom_up: CBAMHRNet,
    cbam_on_outputs: bool = False,
    cbam_reduction: int = 16,
    cbam_kernel_size: int = 7,
    **fpn_kwargs,
) -> FPN:
    """:class:`HRNetFPN` (detectron2's FPN with TEST.PRECISION) over a :class:`CBAMHRNet`, or
    :class:`CBAMFPN` with ``cbam_on_outputs``. Used by
    :func:`build_cbam_hrnet_fpn_backbone` and the LazyConfig files (``configs/lazy``).

    Args:
        bottom_up (CBAMHRNet): the trunk.
        cbam_on_outputs (bool): one CBAM block on each FPN output (p2..p6).
        cbam_reduction, cbam_kernel_size: as in :class:`CBAM`.
        fpn_kwargs: the other arguments of :class:`HRNetFPN` (precision, in_features,
            out_channels, norm, top_block, fuse_type).
    """
    if cbam_on_outputs:
        return CBAMFPN(
            bottom_up=bottom_up,
            cbam_reduction=cbam_reduction,
            cbam_kernel_size=cbam_kernel_size,
            **fpn_kwargs,
        )
    return HRNetFPN(bottom_up=bottom_up, **fpn_kwargs)


def _check_choice(key: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"{key} = {value!r} is not supported; allowed values: {list(allowed)}")


def _check_trunk_args(width, norm, branches, freeze_at) -> None:
    """ValueError naming the argument (and its config key), the value and what is allowed. The one
    check of these values (CBAM checks its own reduction and kernel size)."""
    _check_choice("width (MODEL.CBAM_HRNET.WIDTH)", width, list(HRNET_WIDTHS))
    _check_choice("norm (MODEL.CBAM_HRNET.NORM)", norm, (*HRNET_NORMS, "naiveSyncBN"))
    _check_choice("freeze_at (MODEL.BACKBONE.FREEZE_AT)", freeze_at, range(len(HRNET_STAGES) + 1))
    for branch in branches:
        _check_choice("cbam_branches (MODEL.CBAM.BRANCHES)", branch, HRNET_FEATURES)


def _build_trunk(cfg, input_shape: ShapeSpec, cbam_on_branches: bool) -> CBAMHRNet:
    _check_choice("MODEL.CBAM.POSITION", cfg.MODEL.CBAM.POSITION, CBAM_POSITIONS)
    # fmt: off
    width      = cfg.MODEL.CBAM_HRNET.WIDTH
    norm       = trunk_norm(cfg.MODEL.CBAM_HRNET.NORM, cfg.MODEL.DEVICE)
    freeze_at  = cfg.MODEL.BACKBONE.FREEZE_AT
    branches   = cfg.MODEL.CBAM.BRANCHES if cbam_on_branches else []
    reduction  = cfg.MODEL.CBAM.REDUCTION
    kernel     = cfg.MODEL.CBAM.KERNEL_SIZE
    pretrained = cfg.MODEL.CBAM_HRNET.PRETRAINED
    # fmt: on
    backbone = CBAMHRNet(
        width,
        in_channels=input_shape.channels,
        norm=norm,
        cbam_branches=branches,
        cbam_reduction=reduction,
        cbam_kernel_size=kernel,
        freeze_at=freeze_at,
        activation_checkpointing=cfg.MODEL.CBAM_HRNET.ACTIVATION_CHECKPOINTING,
        cpu_channels_last=cfg.MODEL.CBAM_HRNET.CPU.CHANNELS_LAST,
    )
    if pretrained and cfg.MODEL.WEIGHTS:
        logger.info(
            "MODEL.WEIGHTS (%s) is set and wins: MODEL.CBAM_HRNET.PRETRAINED (%s) is not loaded",
            cfg.MODEL.WEIGHTS,
            pretrained,
        )
    elif pretrained:
        load_pretrained_trunk(backbone.trunk, pretrained, width)
    return backbone


def _log_built(cfg, model: nn.Module, sites: Sequence[str]) -> None:
    params = sum(p.numel() for p in model.parameters())
    logger.info(
        "Built %s: HRNet-W%d, norm %s, CBAM on %s, %.2fM parameters",
        cfg.MODEL.BACKBONE.NAME,
        cfg.MODEL.CBAM_HRNET.WIDTH,
        cfg.MODEL.CBAM_HRNET.NORM,
        ", ".join(sites) or "nothing",
        params / 1e6,
    )


@BACKBONE_REGISTRY.register()
def build_cbam_hrnet_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """
    HRNet trunk with CBAM on the branches listed in MODEL.CBAM.BRANCHES.

    Returns:
        CBAMHRNet: outputs hr2..hr5.
    """
    if cfg.MODEL.CBAM.ENABLED and cfg.MODEL.CBAM.POSITION == "fpn":
        raise ValueError(
            "MODEL.CBAM.POSITION = 'fpn' needs an FPN: set MODEL.BACKBONE.NAME = "
            "'build_cbam_hrnet_fpn_backbone', or MODEL.CBAM.POSITION = 'branches'"
        )
    backbone = _build_trunk(cfg, input_shape, cbam_on_branches=cfg.MODEL.CBAM.ENABLED)
    _log_built(cfg, backbone, list(backbone.cbam))
    return backbone


@BACKBONE_REGISTRY.register()
def build_cbam_hrnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """
    CBAM-HRNet trunk + detectron2's FPN with LastLevelMaxPool (p2..p6). With
    MODEL.CBAM.POSITION "fpn" the CBAM blocks sit on the FPN outputs instead of the branches.

    Returns:
        FPN: outputs p2..p6.
    """
    enabled, position = cfg.MODEL.CBAM.ENABLED, cfg.MODEL.CBAM.POSITION
    check_precision(cfg.TEST.PRECISION, cfg.MODEL.DEVICE)
    bottom_up = _build_trunk(cfg, input_shape, cbam_on_branches=enabled and position == "branches")
    on_outputs = enabled and position == "fpn"
    backbone = hrnet_fpn(
        bottom_up=bottom_up,
        cbam_on_outputs=on_outputs,
        cbam_reduction=cfg.MODEL.CBAM.REDUCTION,
        cbam_kernel_size=cfg.MODEL.CBAM.KERNEL_SIZE,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
        precision=cfg.TEST.PRECISION,
    )
    sites = list(backbone.cbam) if on_outputs else list(bottom_up.cbam)
    _log_built(cfg, backbone, sites)
    return backbone
