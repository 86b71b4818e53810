"""Atomic file writes: the one place that writes a file next to its final name and renames it.

A reader (or a process killed mid-write) never sees a half-written file under the final name, and a
write that fails (disk full, permission, I/O error) removes its temporary file and leaves whatever
was under the final name untouched.
"""

import errno
import os
import shutil
from typing import IO, Callable

__all__ = ["atomic_write", "atomic_write_text", "FileWriteError"]


class FileWriteError(OSError):
    """Writing ``path`` failed; its previous content (if any) is intact and no temporary file
    remains."""


def _root_os_error(exc: BaseException):
    """The first OSError in ``exc``'s chain: torch.save reports a full disk as a RuntimeError of its
    zip writer raised while handling the OSError of the write."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _why(exc: BaseException, directory: str) -> str:
    root = _root_os_error(exc) or exc
    text = f"{type(root).__name__}: {root}"
    if getattr(root, "errno", None) == errno.ENOSPC:
        try:
            free = shutil.disk_usage(directory).free / 2**20
            text += f" (disk full? {free:.1f} MiB free in {directory})"
        except OSError:
            pass
    return text


def atomic_write(path: str, write: Callable[[IO[bytes]], None], *, fsync: bool = True) -> None:
    """Call ``write(f)`` on a hidden temporary file in the directory of ``path``, flush it to disk
    and rename it to ``path``.

    Raises:
        FileWriteError: naming ``path`` and the reason; the temporary file is removed.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.incomplete")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        why = _why(e, directory)  # free space before the partial file is removed
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise FileWriteError(
            getattr(_root_os_error(e), "errno", None) or errno.EIO,
            f"could not write {path}: {why}. The temporary file was removed; what was in {path} "
            "before (if anything) is unchanged.",
        ) from e


def atomic_write_text(path: str, text: str, *, fsync: bool = True) -> None:
    """:func:`atomic_write` of a UTF-8 text."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), fsync=fsync)
