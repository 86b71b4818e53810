"""BatchNorm folded into the preceding conv in eval mode (``MODEL.CPU.FOLD_BN``).

In eval mode a BatchNorm is a per-channel affine map, so ``bn(conv(x))`` equals one conv with scaled
weights and a bias. :class:`FoldedTrunk` runs the trunk that way: every folded conv takes its
weight from the trunk's live conv and BatchNorm (a per-channel product) and the BatchNorm is
skipped. With autograd the product is computed in the call, so gradients reach the trunk's
parameters; without, it is reused while no tensor of the trunk changed (training steps,
``load_state_dict`` and ``.to()`` change them). The same operations either way, so eval-mode
outputs do not depend on ``torch.is_grad_enabled()``; checkpoints and ``state_dict`` never see the
folded view.

Which BatchNorm follows which conv is read from the structure alone (:func:`conv_bn_pairs`), never
guessed from registration order, so no run-time check is needed.
"""

import copy
import re
from contextlib import contextmanager
from typing import List, Tuple

import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["conv_bn_pairs", "FoldedTrunk", "batchnorm_unfolded"]

_NUMBERED = re.compile(r"^(conv|bn)(\d+)$")


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, (_BatchNorm, FrozenBatchNorm2d)) and getattr(m, "affine", True)


def _matches(conv: nn.Module, bn: nn.Module) -> bool:
    return isinstance(conv, nn.Conv2d) and _is_bn(bn) and conv.out_channels == bn.num_features


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
    ``bn``: in the call itself when autograd records (gradients reach both), else the ones
    :class:`FoldedTrunk` last computed from the same tensor versions (the same numbers)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.Module):
        super().__init__()
        # plain attributes, not submodules: the trunk owns them
        self.__dict__["conv"], self.__dict__["bn"] = conv, bn
        self.folded = None

    def fold(self) -> Tuple[torch.Tensor, torch.Tensor]:
        conv, bn = self.conv, self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        w = conv.weight
        if w.is_contiguous(memory_format=torch.channels_last):
            w = (w * scale.reshape(-1, 1, 1, 1)).contiguous(memory_format=torch.channels_last)
        else:
            w = w * scale.reshape(-1, 1, 1, 1)
        return w, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.folded if self.folded is not None else self.fold()
        return self.conv._conv_forward(x, w, b)


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
    """Runs a trunk in eval mode with its BatchNorms folded; set as ``CBAMHRNet.eval_trunk`` by
    :func:`cbam_hrnet_d2.cpu.cpu_speedups` (not an ``nn.Module``, so it is no part of the owner's
    ``state_dict``). The folded view shares every module with the trunk and is rebuilt when the
    trunk's modules change (e.g. BatchNorms converted to FrozenBatchNorm2d). Without autograd the
    folded weights are computed once per version of the trunk's tensors (the same operations, so
    the same numbers); with autograd, in every call."""

    def __init__(self):
        self.pairs: List[Tuple[str, str]] = []
        self.view = None
        self._convs: List[_FoldedConv] = []
        self._modules_key = None
        self._tensors_key = None

    def __call__(self, trunk: nn.Module, x: torch.Tensor):
        modules_key = [id(m) for m in trunk.modules()]
        if modules_key != self._modules_key:
            self.pairs = conv_bn_pairs(trunk)
            self.view = _folded_view(trunk, self.pairs)
            self._convs = [m for m in self.view.modules() if isinstance(m, _FoldedConv)]
            self._modules_key, self._tensors_key = modules_key, None
        if torch.is_grad_enabled():
            self._tensors_key = None
            for c in self._convs:
                c.folded = None
        else:
            tensors = list(trunk.parameters()) + list(trunk.buffers())
            key = [(t.data_ptr(), t._version) for t in tensors]
            if key != self._tensors_key:
                for c in self._convs:
                    c.folded = c.fold()
                self._tensors_key = key
        return self.view(x)


@contextmanager
def batchnorm_unfolded(model: nn.Module):
    """Within the block, every module of ``model`` with an ``eval_trunk`` (``CBAMHRNet`` given a
    :class:`FoldedTrunk`) runs its trunk as it is, BatchNorms included (so that hooks on them fire,
    or fvcore can follow the modules); restored after."""
    folded = [(m, m.eval_trunk) for m in model.modules() if getattr(m, "eval_trunk", None)]
    for m, _ in folded:
        m.eval_trunk = None
    try:
        yield
    finally:
        for m, runner in folded:
            m.eval_trunk = runner
