"""Inference precision (``TEST.PRECISION``): the dtype the backbone + FPN run in, in eval mode.

Under "bf16" the backbone and FPN run under ``torch.autocast`` with bfloat16 and their outputs are
cast back to float32, so that everything after them (RPN, box decoding, NMS, RoIAlign sampling
positions, the heads, mask pasting) runs in float32 as before; on the CPU the CPU speed layer then
runs the RPN, box and mask heads in bf16 too (``MODEL.CPU.BF16_HEADS``, cbam_hrnet_d2/cpu/
bf16_heads.py), their outputs again float32. "fp32" changes nothing. "auto" picks
bf16 where the processor runs it natively (AVX512-BF16 or AMX on the CPU) and the input is large
enough for it to pay (:data:`AUTO_BF16_MIN_PIXELS`), fp32 elsewhere (CUDA included: not measured
there). While a model is traced or exported, it runs float32.

On a CPU without native bf16 (AVX2 only, e.g. AMD Zen 3) PyTorch emulates bfloat16 convolutions and
matrix products. Measured 2026-12-01 on this project's 2-core AMD EPYC (AVX2), 2 threads, best of
3: 1024x1024 matmul 0.44 GMAC/s in bf16 against 43.4 in fp32 (99x), a channels-last 3x3 conv
(64 channels, 128x128) 5.66 against 68.7 (12x); backbone+FPN 6.1x slower (COCO W18, 256x384) and
3.1x (shapes W18, 128x192). "auto" then stays fp32; an explicit "bf16" (or ``SOLVER.AMP.ENABLED``
training on such a CPU) is honoured and :func:`warn_if_emulated_bf16` says what it costs.
"""

import logging
from typing import Dict

import torch

__all__ = [
    "PRECISIONS",
    "AUTO_BF16_MIN_PIXELS",
    "native_bf16",
    "warn_if_emulated_bf16",
    "check_precision",
    "autocast_dtype",
    "is_exporting",
    "run_autocast",
]

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Padded input pixels (H x W) from which "auto" runs bf16 on the CPU. Measured on this project's
# 2-core AVX512-BF16 CPU, 2026-11-25 (docs/precision.md), backbone+FPN time bf16 / fp32: FrozenBN
# trunk (folded) 0.93 at 128x192, 0.61 at 256x384, 0.51 at 800x1216; GroupNorm trunk + FPN (the
# shapes recipe; autocast runs GroupNorm in fp32, casting around every norm) 1.37, 0.99, 0.81.
AUTO_BF16_MIN_PIXELS = 256 * 384


def is_exporting() -> bool:
    """True while torch.jit traces or scripts, torch.onnx exports, or torch.compile / torch.export
    capture a graph."""
    return (
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
    )


def native_bf16(device) -> bool:
    """True where ``device`` runs bfloat16 matrix products natively: a CPU with AVX512-BF16 or AMX
    (CUDA is not measured here: False)."""
    if torch.device(device).type == "cpu":
        cpu = torch.cpu
        return any(
            getattr(cpu, name, lambda: False)()
            for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        )
    return False


def check_precision(precision: str, device: str, key: str = "TEST.PRECISION") -> None:
    """ValueError naming ``key``, the value and the allowed values."""
    if precision not in PRECISIONS:
        raise ValueError(
            f"{key} = {precision!r} is not supported; allowed values: {list(PRECISIONS)}"
        )
    if precision == "fp16" and not str(device).startswith("cuda"):
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


def warn_if_emulated_bf16(key: str, device) -> bool:
    """Log a warning (and return True) when ``key`` asks for bf16 on a CPU that emulates it."""
    if torch.device(device).type != "cpu" or native_bf16(device):
        return False
    logger.warning(
        "%s asks for bfloat16, but this CPU has no native bf16 (no AVX512-BF16 / AMX; PyTorch "
        "reports %s): bf16 convolutions and matrix products are emulated, 12-99x slower than "
        "fp32, backbone+FPN 3-6x (cbam_hrnet_d2/precision.py). Use TEST.PRECISION 'auto' "
        "(fp32 here) and SOLVER.AMP.ENABLED False on this machine.",
        key,
        torch.backends.cpu.get_cpu_capability(),
    )
    return True


def run_autocast(fn, x: torch.Tensor, dtype) -> Dict[str, torch.Tensor]:
    """``fn(x)`` (a dict of feature maps) under autocast to ``dtype`` with float32 outputs, or
    ``fn(x)`` itself when ``dtype`` is None."""
    if dtype is None:
        return fn(x)
    with torch.autocast(x.device.type, dtype=dtype):
        outputs = fn(x)
    return {name: f.float() for name, f in outputs.items()}
