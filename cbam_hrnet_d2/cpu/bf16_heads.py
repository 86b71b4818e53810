"""bf16 through the heads (``MODEL.CBAM_HRNET.CPU.BF16_HEADS``): in eval mode on CPU inputs, the RPN
head's convs, the box head's FCs (and convs) and the mask head's convs and deconv run under bfloat16
autocast where ``TEST.PRECISION`` runs bf16: "bf16", or "auto" on a CPU with native bf16
(AVX512-BF16 or AMX; any input size, unlike the backbone: a head's work does not shrink with the
image, measured in docs/notes/precision-runs.md). Each head's outputs come back float32, so that
anchor and box decoding, NMS, the box predictor's scores and deltas, RoIAlign's sampling
positions, score thresholds and mask pasting stay float32. "fp32" changes nothing, bit for bit.
Training (AMP decides there) and ONNX export run float32; a ``torch.jit.trace`` records the casts.

Forward hooks (PyTorch's own seam for wrapping a module's call) rather than wrapper modules: the
heads keep their names, so checkpoints load unchanged.
"""

from typing import Dict, List, Optional

import torch
from detectron2.structures import Instances
from torch import nn

from cbam_hrnet_d2.device import is_exporting, native_bf16

__all__ = ["HEADS", "heads_dtype", "autocast_on_cpu", "bf16_heads"]

# the heads, by (parent attribute, attribute) on detectron2's GeneralizedRCNN
HEADS = {
    "rpn_head": ("proposal_generator", "rpn_head"),
    "box_head": ("roi_heads", "box_head"),
    "mask_head": ("roi_heads", "mask_head"),
}


def heads_dtype(precision: str) -> Optional[torch.dtype]:
    """The dtype the heads run in on the CPU under ``TEST.PRECISION`` = ``precision``, or None
    (float32)."""
    if precision == "bf16" or (precision == "auto" and native_bf16("cpu")):
        return torch.bfloat16
    return None


def _float32(out):
    """``out`` (a tensor, Instances, or lists / tuples / dicts of them) with half-precision
    floating tensors cast to float32."""
    if torch.is_tensor(out):
        return out.float() if out.dtype in (torch.bfloat16, torch.float16) else out
    if isinstance(out, Instances):
        for name, value in out.get_fields().items():
            out.set(name, _float32(value))
        return out
    if isinstance(out, (list, tuple)):
        return type(out)(_float32(v) for v in out)
    if isinstance(out, dict):
        return {k: _float32(v) for k, v in out.items()}
    return out


def _input_device(args) -> Optional[torch.device]:
    """The device of the first tensor in a call's arguments (tensors, or lists / dicts of them)."""
    for a in args:
        if torch.is_tensor(a):
            return a.device
        if isinstance(a, dict):
            a = list(a.values())
        if isinstance(a, (list, tuple)):
            found = _input_device(a)
            if found is not None:
                return found
    return None


class _AutocastCall:
    """Forward pre-hook + forward hook running one module's call under CPU autocast to ``dtype``,
    decided per call: in eval mode, on CPU inputs, outside graph capture (a model moved to CUDA
    runs its heads as detectron2 does)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.active: List[torch.autocast] = []  # a stack: a head may be called inside another

    def enter(self, module: nn.Module, args) -> None:
        device = _input_device(args)
        if module.training or is_exporting() or device is None or device.type != "cpu":
            self.active.append(None)
            return
        ctx = torch.autocast("cpu", dtype=self.dtype)
        ctx.__enter__()
        self.active.append(ctx)

    def exit(self, module: nn.Module, args, out):
        ctx = self.active.pop() if self.active else None  # None: enter never ran (it raised)
        if ctx is None:
            return None
        ctx.__exit__(None, None, None)
        return _float32(out)


def autocast_on_cpu(module: nn.Module, dtype: torch.dtype) -> None:
    """Run ``module``'s calls on CPU inputs in eval mode under autocast to ``dtype``, outputs cast
    back to float32 (forward hooks: the module keeps its name, checkpoints load unchanged)."""
    call = _AutocastCall(dtype)
    module.register_forward_pre_hook(call.enter)
    module.register_forward_hook(call.exit, always_call=True)


def bf16_heads(model: nn.Module, precision: str) -> Dict[str, torch.dtype]:
    """Run ``model``'s heads (those of :data:`HEADS` it has) in :func:`heads_dtype` of
    ``precision`` on CPU inputs in eval mode; returns {head: dtype} of the heads hooked (empty under
    fp32). For any detectron2 model; ours get it from their own RPN and RoI heads
    (:mod:`cbam_hrnet_d2.modeling.heads`)."""
    dtype = heads_dtype(precision)
    hooked = {}
    if dtype is None:
        return hooked
    for name, (parent, attr) in HEADS.items():
        head = getattr(getattr(model, parent, None), attr, None)
        if head is None:
            continue
        autocast_on_cpu(head, dtype)
        hooked[name] = dtype
    return hooked
