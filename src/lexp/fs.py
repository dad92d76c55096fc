"""Disk problems as one clear line: an unwritable or full cache or run directory is found before
any work (:func:`writable_problem`), and an ``OSError`` that a full, read-only or missing disk
raises later becomes one ``lexp: error:`` message (:func:`disk_error_message`), never a traceback.

No torch, no numpy: lexp.run's Hydra callback uses it before the run directory is written.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = ["DISK_ERRNOS", "disk_error_message", "writable_problem"]

#: errno values that mean "this disk/folder cannot take the write", whatever lexp was writing.
DISK_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is larger than the file system allows",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "the path is a folder, not a file",
    errno.ELOOP: "the path is a symlink loop",
}


def _fix(key: str) -> str:
    if key == "cache_dir":
        return "point cache_dir (or LEXP_CACHE) at a writable folder with free space, e.g. cache_dir=/scratch/$USER/lexp"
    if key.startswith("hydra."):
        return f"point {key} at a writable folder with free space, e.g. {key}=/scratch/$USER/outputs"
    return "free space there or choose a writable folder (cache_dir=..., hydra.run.dir=...)"


def writable_problem(folder: Path | str, key: str) -> str | None:
    """None when ``folder`` exists (or can be created) as a directory this process can write a byte
    into, else one sentence naming ``key``, the folder, the cause and the fix.

    A test file is written, fsynced and removed: a full disk, a read-only mount (which stops root
    too, unlike permission bits) and a path through a regular file are all found here.
    """
    folder = Path(folder).expanduser()
    probe = folder / f".lexp-write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except FileExistsError:
        return f"{key}={folder}: this path is a file, not a folder. Fix: {_fix(key)}"
    except OSError as exc:
        cause = DISK_ERRNOS.get(exc.errno or 0, exc.strerror or str(exc))
        if exc.errno == errno.ENOTDIR:
            cause = "it (or a folder above it) is a file, not a folder"
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
        return f"{key}={folder}: cannot write there ({cause}: {exc.strerror}). Fix: {_fix(key)}"
    return None


def disk_error_message(exc: BaseException) -> str | None:
    """``<file>: cannot write (<cause>) ...`` for an OSError of a full/read-only/missing disk, else None."""
    if not isinstance(exc, OSError) or exc.errno not in DISK_ERRNOS:
        return None
    where = exc.filename or "a file of this run"
    return (
        f"{where}: {DISK_ERRNOS[exc.errno]} ({exc.strerror}). Nothing half-written is kept (results.json "
        "records the failure where the disk allows). Fix: free space there, or point the run elsewhere "
        "(cache_dir=... / LEXP_CACHE for stores and caches, hydra.run.dir=... for the run's outputs), then rerun."
    )


def file_problem(path: Path | str) -> str | None:
    """None for a regular file (or a symlink to one), else what ``path`` is instead, in words:
    "does not exist", "is a folder, not a file", "is a named pipe (FIFO) ...", "is a device ...",
    "is a symlink loop". Reading a FIFO would block and ``/dev/zero`` never ends, so input files
    must be regular files."""
    import stat

    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop (it points back at itself), not a file"
        if exc.errno == errno.ENOTDIR:
            return "does not exist (a part of the path is a file, not a folder)"
        if os.path.islink(path):
            return f"is a symlink to {os.readlink(path)!r}, which does not exist"
        if exc.errno == errno.ENOENT:
            return "does not exist"
        return f"cannot be read ({exc.strerror})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO), not a regular file (lexp reads input files twice: copy it to a file)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    return "is not a regular file"
