"""Whether a run is still going, told from the records folder by any host or container that shares it: every
process of a run holds a shared lock on the run's live mark (``.<stem>.live``) for the run's life, so a mark
nobody holds is a run that has ended; and the lock held while abandoned runs are sealed."""

from __future__ import annotations

import fcntl
import os
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def live_mark_path(records_dir: Path, stem: str) -> Path:
    """The run's live mark: every process of a run holds a shared lock on it for the run's life."""
    return Path(records_dir) / f".{stem}.live"


class LiveMark:
    """A process's hold on its run's live mark (a shared ``flock``). The kernel, the runner and any
    process writing the record each hold one, so "nobody holds the mark" means the run has ended,
    whatever the host, container or pid namespace sharing the folder."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd
        self._releasing = threading.Lock()  # `opslib open` may let go from a watcher thread

    @property
    def held(self) -> bool:
        """True until :meth:`release`."""
        return self._fd is not None

    def release(self, remove: bool = False) -> None:
        """Let go; ``remove`` the file too once the run is sealed (the last holder does)."""
        with self._releasing:
            if self._fd is None:
                return
            if remove:
                self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def hold_live_mark(records_dir: Path, stem: str) -> LiveMark:
    """Take this process's hold on the run's live mark, before the run writes its first sidecar."""
    path = live_mark_path(records_dir, stem)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # not inherited by pg_dump & co.
    fcntl.flock(fd, fcntl.LOCK_SH)
    return LiveMark(path, fd)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:  # no /proc, or one that hides other users' processes: ask the kernel
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _pids_ended(record: dict) -> bool:
    """For a record without a live mark (written by an opslib before marks): its processes are gone.
    Only a record from this host can be judged; anything else is never taken for ended."""
    pids = record.get("pids") or []
    if not pids or record.get("host") != socket.gethostname():
        return False
    return not any(_alive(pid) for pid in pids)


@contextmanager
def ended_run(records_dir: Path, stem: str, record: dict) -> Iterator[bool]:
    """True when the run has ended: nobody holds its live mark, which this process then holds
    exclusively until the block ends (so the run cannot be sealed twice). Unsure is False."""
    path = live_mark_path(records_dir, stem)
    try:
        try:  # read-write where it can (NFS emulates flock with POSIX locks: an exclusive one needs it)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except PermissionError:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield _pids_ended(record)
        return
    except OSError:  # cannot be told from here
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by the run (BlockingIOError), or a lock this file system refuses: unsure
            ended = False
        else:
            ended = True
        yield ended
    finally:
        os.close(fd)


def run_is_live(records_dir: Path, stem: str, record: dict) -> bool:
    """True while a run may still write its record (or when that cannot be told from here)."""
    with ended_run(records_dir, stem, record) as ended:
        return not ended


@contextmanager
def sealing_lock(records_dir: Path) -> Iterator[None]:
    """Held while abandoned runs are sealed, so that two commands never seal the same run twice."""
    path = Path(records_dir) / ".sealing.lock"
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
