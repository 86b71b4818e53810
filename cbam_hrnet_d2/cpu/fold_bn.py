"""BatchNorm folded into the preceding conv in eval mode on the CPU
(``MODEL.CBAM_HRNET.CPU.FOLD_BN``).

In eval mode a BatchNorm is a per-channel affine map, so ``bn(conv(x))`` equals one conv with scaled
weights and a bias. :class:`FoldedTrunk` runs the trunk that way: every folded conv takes its
weight from the trunk's live conv and BatchNorm (a per-channel product, in the call itself, so
gradients reach the trunk's parameters and no cached copy can go stale) and the BatchNorm is
skipped. Checkpoints and ``state_dict`` never see the folded view.

Which BatchNorm follows which conv is read from the structure alone (:func:`conv_bn_pairs`), never
guessed from registration order, so no run-time check is needed.
"""

import copy
import re
from contextlib import contextmanager
from typing import List, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["conv_bn_pairs", "FoldedTrunk", "batchnorm_unfolded"]

_NUMBERED = re.compile(r"^(conv|bn)(\d+)$")


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, (_BatchNorm, FrozenBatchNorm2d)) and getattr(m, "affine", True)


def _matches(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and conv.padding_mode == "zeros"  # what F.conv2d computes
        and _is_bn(bn)
        and conv.out_channels == bn.num_features
    )


def conv_bn_pairs(module: nn.Module) -> List[Tuple[str, str]]:
    """``(conv name, bn name)`` for every BatchNorm of ``module`` that normalises one conv's output,
    by structure: consecutive children of an ``nn.Sequential`` (its order is its forward), and
    siblings ``conv<k>`` / ``bn<k>`` (timm's and torchvision's naming in blocks and stems: ``bn<k>``
    follows ``conv<k>``). Any other BatchNorm is left as it is."""
    pairs = []
    for prefix, parent in module.named_modules():
        prefix = prefix + "." if prefix else ""
        children = list(parent.named_children())
        if isinstance(parent, nn.Sequential):
            candidates = zip(children, children[1:])
        else:
            by_name = dict(children)
            candidates = [
                ((name, child), ("bn" + m.group(2), by_name["bn" + m.group(2)]))
                for name, child in children
                if (m := _NUMBERED.match(name))
                and m.group(1) == "conv"
                and "bn" + m.group(2) in by_name
            ]
        pairs += [
            (prefix + conv_name, prefix + bn_name)
            for (conv_name, conv), (bn_name, bn) in candidates
            if _matches(conv, bn)
        ]
    return pairs


class _FoldedConv(nn.Module):
    """``bn(conv(x))`` as one conv whose weight and bias are folded from the live ``conv`` and
    ``bn`` in the call itself (so gradients reach both, and a weight changed in place is seen)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.Module):
        super().__init__()
        # plain attributes, not submodules: the trunk owns them
        self.__dict__["conv"], self.__dict__["bn"] = conv, bn
        self.channels_last = False

    def fold(self) -> Tuple[torch.Tensor, torch.Tensor]:
        conv, bn = self.conv, self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        w = conv.weight * scale.reshape(-1, 1, 1, 1)
        if self.channels_last or conv.weight.is_contiguous(memory_format=torch.channels_last):
            w = w.contiguous(memory_format=torch.channels_last)
        return w, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.fold()
        c = self.conv
        return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)


def _folded_view(module: nn.Module, pairs: List[Tuple[str, str]]) -> nn.Module:
    """The module tree of ``module`` with each paired conv a :class:`_FoldedConv` and each paired
    BN an identity; containers are shallow copies, every other module is the trunk's own."""
    convs = {conv: bn for conv, bn in pairs}
    bns = set(convs.values())

    def view(m: nn.Module, prefix: str) -> nn.Module:
        if prefix in convs:
            return _FoldedConv(m, module.get_submodule(convs[prefix]))
        if prefix in bns:
            return nn.Identity()
        if not m._modules:
            return m
        copied = copy.copy(m)
        copied._modules = {
            name: view(child, f"{prefix}.{name}" if prefix else name)
            for name, child in m._modules.items()
        }
        return copied

    return view(module, "")


class FoldedTrunk:
    """Runs a trunk in eval mode with its BatchNorms folded (:class:`CBAMHRNet` does, on CPU
    inputs; not an ``nn.Module``, so it is no part of the owner's ``state_dict``). The folded view
    shares every module with the trunk and is rebuilt when the trunk's modules change (e.g.
    BatchNorms converted to FrozenBatchNorm2d); the folded weights are computed from the live
    weights in every call (a per-channel product: about 1% of the trunk's time at 800 px), so no
    cache can go stale and outputs do not depend on ``torch.is_grad_enabled()``."""

    def __init__(self):
        self.pairs: List[Tuple[str, str]] = []
        self.view = None
        self._convs: List[_FoldedConv] = []
        self._modules_key = None

    def __call__(self, trunk: nn.Module, x: torch.Tensor, channels_last: bool = False):
        modules_key = [id(m) for m in trunk.modules()]
        if modules_key != self._modules_key:
            self.pairs = conv_bn_pairs(trunk)
            self.view = _folded_view(trunk, self.pairs)
            self._convs = [m for m in self.view.modules() if isinstance(m, _FoldedConv)]
            self._modules_key = modules_key
        for c in self._convs:
            c.channels_last = channels_last
        return self.view(x)


@contextmanager
def batchnorm_unfolded(model: nn.Module):
    """Within the block, every module of ``model`` with a ``cpu_fold_bn`` switch (``CBAMHRNet``)
    runs its trunk as it is, BatchNorms included (so that hooks on them fire, or fvcore can follow
    the modules); restored after."""
    folded = [m for m in model.modules() if getattr(m, "cpu_fold_bn", False)]
    for m in folded:
        m.cpu_fold_bn = False
    try:
        yield
    finally:
        for m in folded:
            m.cpu_fold_bn = True
