"""
RoIAlign as one sparse-times-dense matrix product, for the CPU.

torchvision's CPU ``roi_align`` (and its backward) runs on one thread, one channel at a time: at
800x1216 it takes ~0.4 s of a 1.7 s Mask R-CNN inference on 2 cores, and ~0.25 s of a shapes-recipe
training step. RoIAlign is linear in the features: every output bin is a weighted sum of feature
pixels (bilinear corners of its sampling points, averaged). :class:`SparseROIAlign` builds those
weights as a CSR matrix ``A`` (bins x pixels) and computes ``A @ F`` with ``F`` the features viewed
as (pixels x channels) — a free view of a channels-last tensor — so forward and backward (``A^T @
grad``) are multi-threaded sparse products. Same sampling grid, clamping and averaging as
torchvision's kernel (``aligned`` and adaptive ``sampling_ratio`` 0 included);
tests/test_cpu_speedups.py checks equality.

On CUDA, for inputs other than float32/float64, and while the model is traced, scripted, exported
or compiled (sparse tensors do not export; the graph must hold for any number of boxes), it runs
detectron2's ``ROIAlign`` (torchvision's kernel: the same numbers). :func:`use_sparse_roi_align`
puts it into a built model's poolers (the CPU speed layer, :mod:`cbam_hrnet_d2.cpu`, does that for a
CPU model).
"""

import warnings
from typing import Tuple

import torch
from detectron2.layers import ROIAlign
from torch import nn

from cbam_hrnet_d2.device import is_tracing

__all__ = ["SparseROIAlign", "use_sparse_roi_align", "roi_align_matrix"]


def _axis_samples(
    start: torch.Tensor, size: torch.Tensor, bins: int, grid: torch.Tensor, length: int
):
    """Sampling along one axis, as torchvision's kernel does it. For each RoI r, bin b and sample i
    (of ``grid[r]``, padded to the largest grid), the low/high pixel index and their weights;
    samples outside the map or past ``grid[r]`` get weight 0."""
    g = max(int(grid.max()), 1) if grid.numel() else 1
    i = torch.arange(g, dtype=start.dtype, device=start.device)
    b = torch.arange(bins, dtype=start.dtype, device=start.device)
    bin_size = (size / bins)[:, None, None]
    gridf = grid.to(start.dtype).clamp(min=1)[:, None, None]
    c = (
        start[:, None, None]
        + b[None, :, None] * bin_size
        + (i[None, None, :] + 0.5) * bin_size / gridf
    )
    valid = (c >= -1.0) & (c <= length) & (i[None, None, :] < grid[:, None, None])
    c = c.clamp(min=0)
    low = c.floor().long()
    at_edge = low >= length - 1
    low = torch.where(at_edge, torch.full_like(low, length - 1), low)
    high = torch.where(at_edge, low, low + 1)
    c = torch.where(at_edge, low.to(c.dtype), c)
    frac = c - low.to(c.dtype)
    w_low, w_high = (1 - frac) * valid, frac * valid
    # (R, bins, g, 2): index and weight of the two neighbours of every sample
    return torch.stack([low, high], -1), torch.stack([w_low, w_high], -1)


def roi_align_matrix(
    rois: torch.Tensor,
    feature_shape: Tuple[int, int, int],
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The (R*PH*PW) x (N*H*W) CSR matrix of RoIAlign over an (N, C, H, W) map, for ``rois`` (R, 5)
    rows ``(batch index, x0, y0, x1, y1)`` in input coordinates."""
    n, h, w = feature_shape
    ph, pw = output_size
    rois = rois.to(torch.float64 if dtype == torch.float64 else torch.float32)
    offset = 0.5 if aligned else 0.0
    x0, y0, x1, y1 = (rois[:, k] * spatial_scale - offset for k in range(1, 5))
    rw, rh = x1 - x0, y1 - y0
    if not aligned:
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    if sampling_ratio > 0:
        gh = gw = torch.full((rois.shape[0],), sampling_ratio, dtype=torch.long, device=rois.device)
    else:
        gh, gw = torch.ceil(rh / ph).long(), torch.ceil(rw / pw).long()
    count = (gh * gw).clamp(min=1).to(rois.dtype)

    iy, wy = _axis_samples(y0, rh, ph, gh, h)  # (R, PH, Gy, 2)
    ix, wx = _axis_samples(x0, rw, pw, gw, w)  # (R, PW, Gx, 2)
    r = rois.shape[0]
    # every (bin, sample, corner) pair: weight = wy * wx / count, column = n*H*W + y*W + x
    wy, iy = wy.reshape(r, ph, 1, -1, 1), iy.reshape(r, ph, 1, -1, 1)
    wx, ix = wx.reshape(r, 1, pw, 1, -1), ix.reshape(r, 1, pw, 1, -1)
    weight = wy * wx / count[:, None, None, None, None]
    batch = rois[:, 0].long()[:, None, None, None, None]
    col = batch * (h * w) + iy * w + ix
    weight, col = weight.reshape(r * ph * pw, -1), col.reshape(r * ph * pw, -1)
    keep = weight != 0
    per_row = keep.sum(1)
    crow = torch.zeros(r * ph * pw + 1, dtype=torch.long, device=rois.device)
    crow[1:] = per_row.cumsum(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        # indices are valid by construction (batch indices checked by the caller)
        return torch.sparse_csr_tensor(
            crow,
            col[keep],
            weight[keep].to(dtype),
            size=(r * ph * pw, n * h * w),
            check_invariants=False,
        )


class SparseROIAlign(ROIAlign):
    """detectron2's :class:`~detectron2.layers.ROIAlign` (same arguments, same results) computed as
    a sparse matrix product on the CPU; see the module docstring."""

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        if (
            is_tracing()  # first: the others would become constants of a traced graph
            or input.is_cuda
            or input.dtype not in (torch.float32, torch.float64)
            or rois.numel() == 0
        ):
            return super().forward(input, rois)
        n, c, h, w = input.shape
        batch = rois[:, 0]
        if batch.min() < 0 or batch.max() >= n:
            raise ValueError(
                f"RoIAlign: batch indices in rois[:, 0] must lie in [0, {n}), got "
                f"[{batch.min().item():g}, {batch.max().item():g}]"
            )
        ph, pw = (
            self.output_size
            if isinstance(self.output_size, (tuple, list))
            else (self.output_size,) * 2
        )
        with torch.no_grad():
            a = roi_align_matrix(
                rois,
                (n, h, w),
                (ph, pw),
                self.spatial_scale,
                self.sampling_ratio,
                self.aligned,
                input.dtype,
            )
        pixels = input.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view when channels-last
        # one path with and without autograd (grad of pixels = A^T @ grad); sparse.mm, not `@`:
        # fvcore traces `@` as aten::matmul and fails on the sparse operand while counting GMACs
        out = torch.sparse.mm(a, pixels)
        return out.view(rois.shape[0], ph, pw, c).permute(0, 3, 1, 2)


def use_sparse_roi_align(module: nn.Module) -> nn.Module:
    """Replace every detectron2 ``ROIAlign`` inside ``module`` by a :class:`SparseROIAlign` with the
    same settings (in place; returns ``module``)."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is ROIAlign:
                setattr(
                    parent,
                    name,
                    SparseROIAlign(
                        child.output_size, child.spatial_scale, child.sampling_ratio, child.aligned
                    ),
                )
    return module
