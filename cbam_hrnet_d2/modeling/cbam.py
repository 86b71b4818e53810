"""CBAM: Convolutional Block Attention Module.

Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", ECCV 2018 (arXiv:1807.06521).
Written in the style of detectron2's ``regnet.py`` ``SE`` block: plain ``nn.Module`` s, no cfg.
"""

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ChannelAttention", "SpatialAttention", "CBAM"]


class ChannelAttention(nn.Module):
    """Channel attention M_c of CBAM (paper eq. 2).

    sigmoid(MLP(AvgPool(x)) + MLP(MaxPool(x))), with one MLP of two bias-free 1x1 convs
    C -> max(1, C // reduction) -> C and a ReLU between, shared by both descriptors.
    """

    def __init__(self, channels: int, reduction: int = 16):
        """
        Args:
            channels (int): number of input channels C.
            reduction (int): MLP reduction ratio r (hidden width max(1, C // r)).
        """
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (Tensor): (N, C, H, W).

        Returns:
            Tensor: attention weights (N, C, 1, 1) in [0, 1].
        """
        n = x.shape[0]
        # Both descriptors go through the shared MLP in one batched call (same result as two calls).
        desc = torch.cat([F.adaptive_avg_pool2d(x, 1), F.adaptive_max_pool2d(x, 1)], dim=0)
        mlp = self.fc2(self.relu(self.fc1(desc)))
        return torch.sigmoid(mlp[:n] + mlp[n:])


class SpatialAttention(nn.Module):
    """Spatial attention M_s of CBAM (paper eq. 3).

    sigmoid(conv_kxk([mean_c(x); max_c(x)])), one bias-free k x k conv with padding k // 2.
    """

    def __init__(self, kernel_size: int = 7):
        """
        Args:
            kernel_size (int): odd size k of the conv over the two pooled maps.
        """
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (Tensor): (N, C, H, W).

        Returns:
            Tensor: attention map (N, 1, H, W) in [0, 1].
        """
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class CBAM(nn.Module):
    """CBAM block: x' = M_c(x) * x, then y = M_s(x') * x'. Output shape equals input shape.

    Set ``keep_attention = True`` (or use :func:`record_attention`) to keep the last channel and
    spatial maps on the module, for pictures; they are detached copies.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        """
        Args:
            channels (int): number of channels C of the features it is applied to.
            reduction (int): channel-attention MLP reduction ratio r, >= 1.
            kernel_size (int): spatial-attention conv size k, odd and positive.
        """
        super().__init__()
        if not isinstance(reduction, int) or reduction < 1:
            raise ValueError(
                f"CBAM reduction (MODEL.CBAM.REDUCTION) = {reduction!r}; allowed values: integers "
                ">= 1"
            )
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"CBAM kernel_size (MODEL.CBAM.KERNEL_SIZE) = {kernel_size!r}; allowed values: odd "
                "positive integers (3, 5, 7, ...)"
            )
        self.channel_attention = ChannelAttention(channels, reduction)
        self.spatial_attention = SpatialAttention(kernel_size)
        self.keep_attention = False
        self.last_attention: Optional[Dict[str, torch.Tensor]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (Tensor): (N, C, H, W).

        Returns:
            Tensor: (N, C, H, W).
        """
        ca = self.channel_attention(x)
        x = x * ca
        sa = self.spatial_attention(x)
        if self.keep_attention:
            # "channel": (N, C, 1, 1), "spatial": (N, 1, H, W)
            self.last_attention = {"channel": ca.detach(), "spatial": sa.detach()}
        return x * sa


class record_attention:
    """Context manager: keep the attention maps of every CBAM in ``model`` while inside.

    Example::

        with record_attention(model) as sites:
            model([inputs])
        maps = {name: m.last_attention for name, m in sites.items()}
    """

    def __init__(self, model: nn.Module):
        self.sites = {name: m for name, m in model.named_modules() if isinstance(m, CBAM)}

    def __enter__(self) -> Dict[str, CBAM]:
        for m in self.sites.values():
            m.keep_attention, m.last_attention = True, None
        return self.sites

    def __exit__(self, *exc) -> None:
        for m in self.sites.values():
            m.keep_attention = False
