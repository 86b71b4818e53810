"""Memory readings: resident memory (now, with data-loader workers, and peak) and glibc's heap
(:class:`cbam_hrnet_d2.engine.hooks.MemoryMonitor` puts them into metrics.json)."""

import ctypes
import functools
import logging
import resource
from typing import Dict

import psutil

__all__ = ["libc", "rss_mib", "peak_rss_mib"]

logger = logging.getLogger(__name__)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@functools.lru_cache(maxsize=None)
def libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


@functools.lru_cache(maxsize=None)
def _mallinfo2():
    fn = getattr(libc(), "mallinfo2", None)
    if fn is not None:
        fn.restype = _MallInfo2
    return fn


def _malloc_stats() -> Dict[str, float]:
    """glibc's view of this process's heap: bytes in use (a leak grows this) and freed bytes it
    keeps (fragmentation grows this); empty where glibc's mallinfo2 is not available."""
    fn = _mallinfo2()
    if fn is None:
        return {}
    info = fn()
    return {
        "malloc_in_use_mib": (info.uordblks + info.hblkhd) / 2**20,
        "malloc_free_held_mib": info.fordblks / 2**20,
    }


def peak_rss_mib() -> float:
    """Peak resident memory of this process since it started. Linux's VmHWM belongs to the process's
    own address space; ``ru_maxrss`` is not reset by exec, so a spawned worker would report at least
    the RSS its parent had when it forked."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> Dict[str, float]:
    """Resident memory of this process and of this process plus its children (data-loader workers),
    and glibc's in-use / free-but-held heap bytes of this process."""
    proc = psutil.Process()
    own = proc.memory_info().rss
    children = 0
    for child in proc.children(recursive=True):
        try:
            children += child.memory_info().rss
        except psutil.Error:  # a worker that exited meanwhile
            pass
    return {
        "rss_mib": own / 2**20,
        "rss_with_workers_mib": (own + children) / 2**20,
        **_malloc_stats(),
    }
