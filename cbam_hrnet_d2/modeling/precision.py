"""Inference precision (``TEST.PRECISION``): the dtype the backbone + FPN run in, in eval mode.

Under "bf16" the backbone and FPN run under ``torch.autocast`` with bfloat16 and their outputs are
cast back to float32, so that everything after them (RPN, box decoding, NMS, RoIAlign sampling
positions, the heads, mask pasting) runs in float32 as before; on CPU inputs the RPN, box and mask
heads run in bf16 too (``MODEL.CBAM_HRNET.CPU.BF16_HEADS``, cbam_hrnet_d2/cpu/bf16_heads.py), their
outputs again float32. "fp32" changes nothing. "auto" picks
bf16 where the processor runs it natively (AVX512-BF16 or AMX on the CPU) and the input is large
enough for it to pay (:data:`AUTO_BF16_MIN_PIXELS`), fp32 elsewhere (CUDA included: not measured
there). While a model is traced or exported, it runs float32.

On a CPU without native bf16 (AVX2 only) PyTorch emulates bfloat16 convolutions and matrix
products, several times slower than fp32 (measured in docs/notes/precision-runs.md): "auto" then
stays fp32;
an explicit "bf16" is honoured and :func:`~cbam_hrnet_d2.device.warn_if_emulated_bf16` says what it
costs. Which CPU has native bf16 is a device rule (:mod:`cbam_hrnet_d2.device`).
"""

from typing import Dict, Optional

import torch

from cbam_hrnet_d2.device import is_cpu, is_exporting, native_bf16

__all__ = [
    "PRECISIONS",
    "AUTO_BF16_MIN_PIXELS",
    "check_precision",
    "autocast_dtype",
    "run_autocast",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Padded input pixels (H x W) from which "auto" runs bf16 on the CPU: below it bf16 did not pay for
# the GroupNorm trunk of the shapes recipe (docs/notes/precision-runs.md, "Where bf16 pays").
AUTO_BF16_MIN_PIXELS = 256 * 384


def check_precision(
    precision: str, device: Optional[str] = None, key: str = "TEST.PRECISION"
) -> None:
    """ValueError naming ``key``, the value and the allowed values; with ``device``, also where
    "fp16" is asked for off CUDA."""
    if precision not in PRECISIONS:
        raise ValueError(
            f"{key} = {precision!r} is not supported; allowed values: {list(PRECISIONS)}"
        )
    if precision == "fp16" and device is not None and is_cpu(device):
        raise ValueError(
            f"{key} = 'fp16' needs CUDA (MODEL.DEVICE is {device!r}); on the CPU use 'bf16', "
            "'fp32' or 'auto'"
        )


def autocast_dtype(precision: str, x: torch.Tensor):
    """The autocast dtype for running on ``x`` (N, C, H, W) under ``precision``, or None (fp32)."""
    if precision == "fp32" or is_exporting():
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    big = x.shape[-2] * x.shape[-1] >= AUTO_BF16_MIN_PIXELS
    return torch.bfloat16 if big and native_bf16(x.device) else None


def run_autocast(fn, x: torch.Tensor, dtype) -> Dict[str, torch.Tensor]:
    """``fn(x)`` (a dict of feature maps) under autocast to ``dtype`` with float32 outputs, or
    ``fn(x)`` itself when ``dtype`` is None."""
    if dtype is None:
        return fn(x)
    with torch.autocast(x.device.type, dtype=dtype):
        outputs = fn(x)
    return {name: f.float() for name, f in outputs.items()}
