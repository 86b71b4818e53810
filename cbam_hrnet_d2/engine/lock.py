"""One run per output folder.

A cluster that requeues a job while the first copy still runs, or a second command typed into the
same ``OUTPUT_DIR``, would otherwise train twice into one folder: checkpoints, ``last_checkpoint``
and metrics interleaved, nothing said. :func:`claim_output_dir` (called by ``train_net.py`` and
``lazy_train_net.py`` in the launching process, before any worker starts) writes
``OUTPUT_DIR/run.lock`` with the holder's host, process id, start time and command, created with
``O_EXCL`` so that of two simultaneous starts exactly one wins.

* **A lease.** The holding process renews the lock every third of its lease (``CBAM_HRNET.RUN_LOCK.
  LEASE_SECONDS``, 180 s by default): the file's modification time is the heartbeat. A lock not
  renewed for longer than its lease is stale on any host, and is taken over with a warning naming
  the old holder: a job killed by SIGKILL, out-of-memory or a lost node and requeued by SLURM or
  Kubernetes on another node (another hostname, a new container) starts by itself once the lease
  has run out.
* A training run into a folder held by a live process (a renewed lock, or one of this host whose
  process is alive) stops with an error naming the holder.
* A lock left by a process that died on this host is taken over at once, with a warning.
* ``--eval-only`` into a held folder writes into its own sub-folder
  ``OUTPUT_DIR/eval_<host>_<pid>/`` instead (evaluating a checkpoint while training continues is
  normal), and says so.
"""

import contextlib
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
from typing import Iterator, Optional

__all__ = ["LOCK_FILE", "DEFAULT_LEASE_S", "OutputDirBusy", "read_lock", "claim_output_dir"]

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
DEFAULT_LEASE_S = 180.0  # CBAM_HRNET.RUN_LOCK.LEASE_SECONDS


class OutputDirBusy(RuntimeError):
    """The output folder belongs to another run that is (or may be) alive."""


def read_lock(output_dir: str) -> Optional[dict]:
    """The holder written in ``output_dir``'s lock file, None if there is none; an unreadable file
    reads as ``{}`` (a holder that died while writing it)."""
    try:
        with open(os.path.join(output_dir, LOCK_FILE)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _seconds_since_renewed(path: str) -> float:
    try:
        return time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return 0.0


def _why_stale(holder: dict, path: str, lease_s: float) -> Optional[str]:
    """Why the lock at ``path`` no longer holds, or None where it does."""
    if not holder:
        return "unreadable lock file"
    idle = _seconds_since_renewed(path)
    if idle > lease_s:
        return f"not renewed for {idle:.0f} s, longer than its lease of {lease_s:.0f} s"
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
        return "its process is gone"
    return None


class _Renewer:
    """Touches the lock file every ``period`` seconds in a daemon thread until stopped."""

    def __init__(self, path: str, period: float):
        self._path, self._period = path, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="run.lock lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            try:
                os.utime(self._path)
            except OSError as e:  # removed by hand, or the disk went away: say so, keep going
                logger.warning("Could not renew %s (%s)", self._path, e)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return (
        f"process {holder.get('pid')} on host {holder.get('host')!r}, started {started}: "
        f"{holder.get('command', '?')}"
    )


def _try_create(path: str, me: dict) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    return True


@contextlib.contextmanager
def claim_output_dir(
    output_dir: str, *, eval_only: bool = False, lease_s: float = DEFAULT_LEASE_S
) -> Iterator[str]:
    """Hold ``output_dir`` for this run; yields the folder the run must write to (``output_dir``,
    or for ``eval_only`` into a held folder, a sub-folder of its own). The lock is renewed every
    ``lease_s / 3`` seconds while the block runs and removed when it exits, whatever the exit.
    Raises :class:`OutputDirBusy` for a training run into a held folder."""
    if not lease_s > 0:
        raise ValueError(f"CBAM_HRNET.RUN_LOCK.LEASE_SECONDS = {lease_s!r} must be > 0 (e.g. 180)")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    host, pid = socket.gethostname(), os.getpid()
    me = {
        "host": host,
        "pid": pid,
        "started": time.time(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
    }
    for _ in range(3):  # another process may take over the same stale lock meanwhile
        if _try_create(path, me):
            break
        holder = read_lock(output_dir)
        if holder is None:
            continue  # released meanwhile
        why = _why_stale(holder, path, lease_s)
        if why:
            logger.warning(
                "Taking over %s: its holder is gone (%s; %s)",
                path,
                why,
                _describe(holder) if holder else "no holder recorded",
            )
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        if eval_only:
            own = os.path.join(output_dir, f"eval_{host}_{pid}")
            logger.warning(
                "OUTPUT_DIR %s is in use by a training run (%s); this evaluation writes to %s",
                output_dir,
                _describe(holder),
                own,
            )
            os.makedirs(own, exist_ok=True)
            yield own
            return
        other_host = holder.get("host") != host
        raise OutputDirBusy(
            f"OUTPUT_DIR {output_dir} is in use by {_describe(holder)}, which renewed its lock "
            f"{_seconds_since_renewed(path):.0f} s ago. Two runs in one folder would interleave "
            "their checkpoints and metrics: give this run another OUTPUT_DIR, or wait for that one "
            "to end"
            + (
                f". The holder runs on another host: if that job is gone, its lock is taken over "
                f"once it is {lease_s:.0f} s old (CBAM_HRNET.RUN_LOCK.LEASE_SECONDS), or delete "
                f"{path}"
                if other_host
                else ""
            )
        )
    else:
        raise OutputDirBusy(f"could not take {path}: other processes keep claiming it")
    renewer = _Renewer(path, lease_s / 3)
    try:
        yield output_dir
    finally:
        renewer.stop()
        if read_lock(output_dir) == me:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
