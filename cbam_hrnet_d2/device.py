"""The device rules, in one place: every other module asks here, as detectron2 asks ``comm`` for
the process layout.

* **CPU or not:** :func:`is_cpu` (``MODEL.DEVICE`` / a LazyConfig's ``train.device``); the CPU
  speed layer (:mod:`cbam_hrnet_d2.cpu`) applies exactly where it is true.
* **Native bf16:** :func:`native_bf16` (AVX512-BF16 or AMX on the CPU);
  :func:`warn_if_emulated_bf16` where bf16 is asked for on a CPU that emulates it (12-99x slower
  matrix products, measured in docs/notes/precision-runs.md).
* **Norms:** :func:`trunk_norm` (torch's SyncBatchNorm needs CUDA: detectron2's naiveSyncBN on the
  CPU, which all-reduces over gloo).
* **AMP:** :func:`amp_dtype` (bf16 on the CPU, fp16 or bf16 on CUDA).
* **Processes:** :func:`cpu_threads_per_process` (the cores this process may use shared by its local
  processes, on either device: data loading and CPU-side work of 8 GPU processes would otherwise
  each start one thread per core), :func:`hide_gpus` (CPU processes on a CUDA host),
  :func:`ddp_device_ids`.
* **Graph capture:** :func:`is_exporting` (an export for another runtime runs float32 and the
  dense kernels); ``torch.jit.trace`` is not one: a trace records what eager runs, the precision
  casts included, so that a traced model agrees with the eager one (:func:`is_tracing` for the
  parts whose shapes depend on the data).
"""

import logging
import os
from typing import List, Optional

import torch

__all__ = [
    "run_device",
    "is_cpu",
    "native_bf16",
    "warn_if_emulated_bf16",
    "is_exporting",
    "is_tracing",
    "trunk_norm",
    "AMP_PRECISIONS",
    "amp_dtype",
    "available_cores",
    "cpu_threads_per_process",
    "hide_gpus",
    "ddp_device_ids",
]

logger = logging.getLogger(__name__)


def run_device(requested: str) -> str:
    """The device a run takes for ``MODEL.DEVICE`` / ``train.device`` = ``requested``: "cpu" where
    CUDA is not available (the one place of this rule: YAML and LazyConfig loading, the demo)."""
    return requested if torch.cuda.is_available() else "cpu"


def is_cpu(device) -> bool:
    """True where ``device`` ("cpu", "cuda", "cuda:1", a torch.device) is the CPU."""
    return torch.device(device).type == "cpu"


def native_bf16(device) -> bool:
    """True where ``device`` runs bfloat16 matrix products natively: a CPU with AVX512-BF16 or AMX
    (CUDA is not measured here: False)."""
    if is_cpu(device):
        cpu = torch.cpu
        return any(
            getattr(cpu, name, lambda: False)()
            for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        )
    return False


def warn_if_emulated_bf16(key: str, device) -> bool:
    """Log a warning (and return True) when ``key`` asks for bf16 on a CPU that emulates it."""
    if not is_cpu(device) or native_bf16(device):
        return False
    logger.warning(
        "%s asks for bfloat16, but this CPU has no native bf16 (no AVX512-BF16 / AMX; PyTorch "
        "reports %s): bf16 convolutions and matrix products are emulated, 12-99x slower than "
        "fp32, backbone+FPN 3-6x (docs/notes/precision-runs.md). Use TEST.PRECISION 'auto' "
        "(fp32 here) and SOLVER.AMP.ENABLED False on this machine.",
        key,
        torch.backends.cpu.get_cpu_capability(),
    )
    return True


def is_exporting() -> bool:
    """True while a graph is captured for another runtime: torch.onnx export, torch.jit scripting,
    torch.compile / torch.export. Not under ``torch.jit.trace`` alone (see the module doc)."""
    return (
        torch.jit.is_scripting() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
    )


def is_tracing() -> bool:
    """True while any graph is captured (``torch.jit.trace`` included): code whose work depends on
    the data (the number of boxes) takes its traceable path."""
    return torch.jit.is_tracing() or is_exporting()


def trunk_norm(norm: str, device) -> str:
    """The norm the HRNet trunk is built with for ``MODEL.CBAM_HRNET.NORM`` = ``norm`` on
    ``device``:
    "SyncBN" becomes detectron2's "naiveSyncBN" on the CPU (torch's SyncBatchNorm needs CUDA across
    processes; detectron2's all-reduce version runs on gloo)."""
    return "naiveSyncBN" if norm == "SyncBN" and is_cpu(device) else norm


AMP_PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16}


def amp_dtype(precision: str, device) -> torch.dtype:
    """The autocast dtype of AMP training (``SOLVER.AMP.PRECISION`` = ``precision``) on ``device``:
    "auto" is bf16 on the CPU, fp16 on CUDA (as detectron2); fp16 needs CUDA. ValueError naming the
    key and the allowed values otherwise."""
    if precision not in ("auto", *AMP_PRECISIONS):
        raise ValueError(
            f"SOLVER.AMP.PRECISION = {precision!r} is not supported; allowed values: "
            f"{['auto', *AMP_PRECISIONS]}"
        )
    on_cpu = is_cpu(device)
    if precision == "auto":
        precision = "bf16" if on_cpu else "fp16"
    if on_cpu and precision != "bf16":
        raise ValueError(
            "SOLVER.AMP.PRECISION = 'fp16' needs CUDA (MODEL.DEVICE is 'cpu'); AMP on the CPU "
            "runs bf16: set SOLVER.AMP.PRECISION bf16"
        )
    return AMP_PRECISIONS[precision]


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (a cluster's cpuset, ``taskset``, or
    runs placed side by side by ``run_ablation.py --parallel``), else ``os.cpu_count()``."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def cpu_threads_per_process(local_processes: int, cores: Optional[int] = None) -> int:
    """The cores this process may use (:func:`available_cores`) shared by the ``local_processes``
    of its run, at least 1."""
    cores = cores or available_cores()
    return max(1, cores // max(1, local_processes))


def hide_gpus(device) -> bool:
    """True where the workers of a multi-process run on ``device`` must not see the GPUs: CPU
    processes on a CUDA host (detectron2's workers otherwise take NCCL and one GPU each)."""
    return is_cpu(device) and torch.cuda.is_available()


def ddp_device_ids(model: torch.nn.Module, local_rank: int) -> Optional[List[int]]:
    """``device_ids`` of DistributedDataParallel for ``model``: ``[local_rank]`` for a CUDA model
    (detectron2's choice), None for a CPU model (DDP over gloo rejects device ids)."""
    param = next(model.parameters(), None)
    if param is None or is_cpu(param.device):
        return None
    return [local_rank]
