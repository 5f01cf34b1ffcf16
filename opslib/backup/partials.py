"""The files a backup is written under until it is complete, and the clean-up of those killed backups left.

A dump is written under a hidden ``.partial`` name and renamed only once complete and checksummed, so
an interrupted backup never leaves a file under a final name. What a killed run leaves is cleaned up
by the next one: a backup removes the partial dumps no live writer holds (each writer holds an
``flock`` on its partial file, and its pg_dump inherits it).
"""

from __future__ import annotations

import fcntl
import os
from datetime import datetime, timedelta
from pathlib import Path

from opslib.backup.manifest import STAMP, _now, _safe
from opslib.errors import BackupNotTaken


def _partial_of(folder: Path, database: str, moment: datetime) -> Path:
    """The hidden name a dump is written under until it is complete: ``.<database>_<stamp>.dump.partial``.

    It names no revision: pg_dump starts before the revision is read (see :func:`backup`).
    """
    return folder / f".{_safe(database)}_{moment.strftime(STAMP)}.dump.partial"


def _final_stem(database: str, moment: datetime, revision: str) -> str:
    """``<database>_<stamp>_<revision>``: the name of a finished backup and its manifest, without suffix."""
    return f"{_safe(database)}_{moment.strftime(STAMP)}_{_safe(revision)}"


def _same_file(path: Path, fd: int) -> bool:
    """True when ``path`` still names the file open as ``fd`` (not removed, not replaced)."""
    try:
        on_disk, held = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except OSError:
        return False
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _second_taken(folder: Path, database: str, moment: datetime) -> bool:
    """True when a finished backup of ``database`` in ``folder`` already has this second's stamp."""
    prefix = f"{_safe(database)}_{moment.strftime(STAMP)}_"
    return any(folder.glob(f"{prefix}*.dump")) or any(folder.glob(f"{prefix}*.json"))


def _claim_partial(folder: Path, database: str, moment: datetime) -> tuple[datetime, int]:
    """A second no backup of ``database`` in ``folder`` has yet, and its partial file, created and locked here.

    Two backups in one second get consecutive stamps. The exclusive ``flock`` on the partial file is
    what tells a live writer from a dead one: it is held by opslib and by the pg_dump writing the file
    (which inherits it), and the kernel drops it when both are gone, however they ended. Returns the
    stamp's moment and the descriptor holding the lock; a folder that cannot be written is
    :class:`BackupNotTaken`.
    """
    while True:
        partial = _partial_of(folder, database, moment)
        if not _second_taken(folder, database, moment):
            try:
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                fd = None  # another backup of this second is writing it
            except OSError as err:
                raise BackupNotTaken(
                    f"cannot write in the backups folder {folder}: {err.strerror or err}; no backup was taken: "
                    "make it writable, or choose another with --out or OPSLIB_BACKUPS_DIR"
                ) from None
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
                # A clean-up may have taken the file between its creation and the lock (it takes only
                # unlocked files): then it is gone, or another one is there, and the claim starts again.
                if not _same_file(partial, fd):
                    os.close(fd)
                    continue
                # A backup of this second that finished between the look and the claim (its partial
                # file renamed away just before ours was made) is seen now: the next second is taken.
                if not _second_taken(folder, database, moment):
                    return moment, fd
                partial.unlink(missing_ok=True)
                os.close(fd)
        moment += timedelta(seconds=1)


# A manifest or verification is written under a temporary name for milliseconds; older ones are debris.
_STALE_JSON_S = 60.0


def remove_stale_partials(folder: Path, before: datetime | None = None) -> list[Path]:
    """Remove what killed backups left in ``folder``; returns the files removed.

    A partial dump is removed only when no live writer holds its lock (see :func:`_claim_partial`)
    and it is older than ``before`` (default now): a concurrent backup's partial file is never touched.
    A partial manifest is removed when older than a minute. What cannot be removed is left as it is.
    """
    cutoff = (before or _now()).timestamp()
    removed = []
    for path in sorted(folder.glob(".*.partial")):
        try:
            if path.name.endswith(".dump.partial"):
                if _remove_if_unlocked(path, cutoff):
                    removed.append(path)
            elif path.stat(follow_symlinks=False).st_mtime < cutoff - _STALE_JSON_S:
                path.unlink()
                removed.append(path)
        except OSError:
            continue  # gone meanwhile, or not ours to remove: the backup goes on without it
    return removed


def _remove_if_unlocked(path: Path, cutoff: float) -> bool:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        if os.fstat(fd).st_mtime >= cutoff:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live backup (opslib, or the pg_dump it started) is writing it
        if not _same_file(path, fd):
            return False  # replaced since it was opened: the new file is someone else's
        path.unlink()
        return True
    finally:
        os.close(fd)
