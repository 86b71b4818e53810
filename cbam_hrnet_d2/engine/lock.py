"""One run per output folder.

A cluster that requeues a job while the first copy still runs, or a second command typed into the
same ``OUTPUT_DIR``, would otherwise train twice into one folder: checkpoints, ``last_checkpoint``
and metrics interleaved, nothing said. :func:`claim_output_dir` (called by ``train_net.py`` and
``lazy_train_net.py`` in the launching process, before any worker starts) writes
``OUTPUT_DIR/run.lock`` with the holder's host, process id, start time and command, created with
``O_EXCL`` so that of two simultaneous starts exactly one wins.

* A training run into a folder held by a live process stops with an error naming the holder.
* A lock left by a process that died (same host, no such process) is taken over with a warning; a
  lock from another host cannot be checked and is refused, naming the host and the file to delete
  if that job is gone.
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
import time
from typing import Iterator, Optional

__all__ = ["LOCK_FILE", "OutputDirBusy", "read_lock", "claim_output_dir"]

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


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


def _holder_is_dead(holder: dict) -> bool:
    if not holder:
        return True
    return holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1)))


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
def claim_output_dir(output_dir: str, *, eval_only: bool = False) -> Iterator[str]:
    """Hold ``output_dir`` for this run; yields the folder the run must write to (``output_dir``,
    or for ``eval_only`` into a held folder, a sub-folder of its own). The lock is removed when
    the block exits, whatever the exit. Raises :class:`OutputDirBusy` for a training run into a
    held folder."""
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
        if _holder_is_dead(holder):
            logger.warning(
                "Taking over %s: its holder is gone (%s)",
                path,
                _describe(holder) if holder else "unreadable lock file",
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
            f"OUTPUT_DIR {output_dir} is in use by {_describe(holder)}. Two runs in one folder "
            "would interleave their checkpoints and metrics: give this run another OUTPUT_DIR, or "
            "wait for that one to end"
            + (
                f". The holder runs on another host, which this machine cannot check: if that job "
                f"is gone, delete {path}"
                if other_host
                else ""
            )
        )
    else:
        raise OutputDirBusy(f"could not take {path}: other processes keep claiming it")
    try:
        yield output_dir
    finally:
        if read_lock(output_dir) == me:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
