"""Per-entry file locks for the caches that concurrent jobs share (stores, fine-tuned models, linkages).

Every cache entry is a directory named by a fingerprint; a sweep may start any number of jobs at once
that want the same entry (the same store for every analysis of a task, the same fine-tuned model for
every analysis of a sentence task, the same linkage for every ct). :func:`ensure_entry` makes them
agree without a coordinator:

* readers check and open the entry under a **shared** ``flock`` on ``<entry>.lock``, so several jobs
  read at once, and none of them sees the entry deleted or replaced half-way (a builder needs the
  exclusive lock, which waits for every reader to finish opening);
* a job that finds the entry missing (or incomplete, e.g. an older cache format) takes the
  **exclusive** lock, checks again (another job may have built it meanwhile) and only then builds:
  exactly one job builds, the others wait and reuse what it wrote;
* builders write into ``<entry>.partial-<pid>`` and rename into place, so an entry is complete or
  absent; a builder that died leaves only a partial directory, which the next builder removes
  (:func:`remove_partials`: under the exclusive lock every partial is stale, whichever host or pid
  wrote it).

Stale locks: ``flock`` belongs to the open file, and the kernel releases it when the process exits
or is killed (SIGKILL, OOM, a SLURM time limit), so a dead job never blocks the others; the empty
``.lock`` files stay behind and are harmless. Why ``flock`` and not pid files: no clean-up protocol,
no clock, no polling. On a cluster the cache must be on a file system with working ``flock``
(local disks, NFSv4 and most cluster file systems do; Lustre needs the ``flock`` mount option).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

__all__ = [
    "PARTIAL",
    "ensure_entry",
    "entry_lock",
    "lock_path",
    "pid_alive",
    "remove_partials",
    "replace_dir",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: ``<entry>.partial-<pid>``: a directory being written (never read)
PARTIAL = ".partial-"


def lock_path(entry: Path | str) -> Path:
    """``<entry>.lock``: the lock file beside a cache entry (the entry itself may not exist yet)."""
    entry = Path(entry)
    return entry.with_name(entry.name + ".lock")


@contextlib.contextmanager
def entry_lock(entry: Path | str, *, shared: bool = False) -> Iterator[None]:
    """Hold an ``flock`` on ``<entry>.lock``: shared (readers) or exclusive (the one builder).

    Blocks until granted. Released on exit, and by the kernel if the process dies.
    """
    path = lock_path(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def ensure_entry(
    entry: Path | str,
    *,
    ready: Callable[[Path], bool],
    build: Callable[[Path], None],
    load: Callable[[Path], T],
) -> tuple[T, bool]:
    """``(load(entry), reused)``: open a complete cache entry, or build it first (exactly once).

    ``ready(entry)`` says whether the entry is complete and usable; ``build(entry)`` writes it (into
    a partial directory, renamed into place); ``load(entry)`` opens it. Concurrent callers for the
    same entry: one builds under the exclusive lock, the others wait, then load (``reused=True``).
    ``load`` always runs under a lock, so an entry is never replaced while a job opens it.
    """
    entry = Path(entry).expanduser()
    if entry.parent.is_dir():
        with entry_lock(entry, shared=True):
            if ready(entry):
                return load(entry), True
    with entry_lock(entry):
        if ready(entry):  # another job built it while we waited
            return load(entry), True
        build(entry)
        if not ready(entry):
            raise RuntimeError(f"{entry}: the cache entry is still incomplete after it was built")
        return load(entry), False


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_partials(entry: Path | str, *, only_dead: bool = False) -> list[Path]:
    """Delete the ``<entry>.partial-<pid>`` directories of earlier, interrupted builds.

    Call it under the entry's exclusive lock, where every partial is stale (``only_dead=False``:
    also right for partials written on another host of a shared file system). Without the lock,
    ``only_dead=True`` removes only those of this process and of pids no longer running here.
    Returns what was removed.
    """
    entry = Path(entry)
    removed: list[Path] = []
    if not entry.parent.is_dir():
        return removed
    for partial in entry.parent.glob(f"{glob.escape(entry.name)}{PARTIAL}*"):
        pid_text = partial.name.rsplit(PARTIAL, 1)[1]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if only_dead and pid != os.getpid() and pid_alive(pid):
            continue
        shutil.rmtree(partial, ignore_errors=True)
        removed.append(partial)
    if removed:
        log.info("removed %d interrupted partial build(s) of %s", len(removed), entry)
    return removed


def replace_dir(partial: Path, entry: Path) -> None:
    """Move a finished ``partial`` directory to ``entry``, replacing an older (incomplete) one.

    Call it under the entry's exclusive lock: readers hold the shared lock while they open an
    entry, so none is reading the old one when it goes (a memory map stays valid after the
    file is unlinked).
    """
    if entry.exists():
        shutil.rmtree(entry)
    os.replace(partial, entry)
