"""Inference-time folding of BatchNorm into the preceding conv (``MODEL.HRNET.FOLD_BN``).

In eval mode a BatchNorm is a per-channel affine map, so ``bn(conv(x))`` equals one conv with scaled
weights and a bias. :class:`FoldedTrunk` keeps such a folded copy of the HRNet trunk next to the
trainable one and rebuilds it whenever a weight or statistic of the trunk changed (training steps,
``load_state_dict``, ``.to()``), so checkpoints, training and ``state_dict`` never see it.
"""

import copy
import logging
from typing import List, Optional, Tuple

import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = ["fold_batchnorm", "FoldedTrunk"]

logger = logging.getLogger(__name__)


def _fold_into(conv: nn.Conv2d, bn: nn.Module) -> None:
    """Fold ``bn`` (eval mode) into ``conv`` in place (``conv`` belongs to the folded copy)."""
    conv.weight, conv.bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, (_BatchNorm, FrozenBatchNorm2d)) and getattr(m, "affine", True)


def fold_batchnorm(module: nn.Module) -> Tuple[nn.Module, int]:
    """Return an eval-mode copy of ``module`` in which every BatchNorm registered right after a
    Conv2d of matching width in the same parent (timm's HRNet blocks, stems, transitions and fuse
    layers run them in that order) is folded into the conv, and the number folded."""
    folded = copy.deepcopy(module).eval()
    count = 0

    def visit(parent: nn.Module) -> None:
        nonlocal count
        prev = None
        for name, child in list(parent.named_children()):
            if (
                _is_bn(child)
                and isinstance(prev, nn.Conv2d)
                and prev.out_channels == child.num_features
            ):
                _fold_into(prev, child)
                setattr(parent, name, nn.Identity())
                count += 1
            else:
                visit(child)
            prev = child

    visit(folded)
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded, count


def _state_key(module: nn.Module) -> List[Tuple[int, int]]:
    return [(t.data_ptr(), t._version) for t in list(module.parameters()) + list(module.buffers())]


class FoldedTrunk:
    """Lazily built, automatically refreshed BN-folded copy of a trunk (not an ``nn.Module``, so
    it is no part of the owner's ``state_dict``).

    The fold is checked once, on a small random input against the unfolded trunk; if the outputs
    differ (a module whose conv/BN order differs from its registration order), folding is switched
    off with a warning and the plain trunk is used.
    """

    def __init__(self):
        self._folded: Optional[nn.Module] = None
        self._key = None
        self.disabled = False

    def get(self, trunk: nn.Module) -> nn.Module:
        if self.disabled:
            return trunk
        key = _state_key(trunk)
        if self._folded is None or key != self._key:
            folded, count = fold_batchnorm(trunk)
            if count == 0:  # GroupNorm trunk: nothing to fold
                self.disabled = True
                return trunk
            if self._folded is None and not self._check(trunk, folded):
                return trunk
            self._folded, self._key = folded, key
        return self._folded

    def _check(self, trunk: nn.Module, folded: nn.Module) -> bool:
        x = torch.randn(
            1, next(trunk.parameters()).shape[1], 64, 64, generator=torch.Generator().manual_seed(0)
        )
        x = x.to(next(trunk.parameters()).device)
        with torch.no_grad():
            ok = all(
                (a - b).abs().max() <= 1e-3 * a.abs().max() + 1e-5
                for a, b in zip(trunk(x), folded(x))
            )
        if not ok:
            logger.warning(
                "Folding BatchNorm changed the trunk's outputs: MODEL.HRNET.FOLD_BN switched off"
            )
            self.disabled = True
        return ok
