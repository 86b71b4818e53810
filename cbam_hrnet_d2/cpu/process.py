"""The process on a CPU: threads per process (on either device: CPU-side work of several GPU
processes shares the cores too) and glibc keeping large blocks in its heap."""

import logging

import torch
from detectron2.utils import comm

from cbam_hrnet_d2.device import cpu_threads_per_process, is_cpu
from cbam_hrnet_d2.utils.memory import libc

__all__ = ["set_cpu_threads", "keep_large_allocations_in_heap"]

logger = logging.getLogger(__name__)


def set_cpu_threads(device: str) -> int:
    """Share the machine's cores between the processes of this machine
    (:func:`~cbam_hrnet_d2.device.cpu_threads_per_process`; on CUDA too: 8 GPU processes would
    otherwise each start one thread per core for their CPU-side work), and on the CPU (``device``
    "cpu": MODEL.DEVICE, or train.device of a LazyConfig) keep large tensors' memory in the heap
    (:func:`keep_large_allocations_in_heap`). Returns the threads of this process."""
    local = comm.get_local_size()
    threads = cpu_threads_per_process(local)
    torch.set_num_threads(threads)
    if is_cpu(device):
        keep_large_allocations_in_heap()
    logger.info(
        "%s run: %d process(es) on this machine, %d CPU thread(s) each",
        "CPU" if is_cpu(device) else "CUDA",
        local,
        threads,
    )
    return threads


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt() parameters


def keep_large_allocations_in_heap() -> bool:
    """Make glibc serve every allocation from its heap and never give freed heap back to the OS.

    By default glibc maps each block of 32 MiB or more freshly with mmap() and unmaps it on free, so
    a training step page-faults its large activations (RoI features, mask-head maps, FPN maps) in
    again every time. Kept in the heap, freed blocks are reused; the process's
    RSS then stays at its peak (measured in docs/notes/cpu-recipe.md). Process-wide, idempotent;
    returns
    False where libc is not glibc."""
    c = libc()
    if c is None or not hasattr(c, "mallopt"):
        return False
    return bool(c.mallopt(_M_MMAP_MAX, 0)) and bool(c.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
