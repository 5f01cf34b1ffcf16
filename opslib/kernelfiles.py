"""The files a run's kernel leaves in the temporary folder, named for the runner that owns them.

A kernel talks to its runner over Unix sockets and reads a connection file (mode 0600, holding the
key that signs its messages); jupyter_client does not remove them on an immediate shutdown, and a
runner killed with SIGKILL removes nothing. Every name starts with ``opslib-kernel-<runner pid>-``,
so that any later opslib command can tell whose they are: those of a runner that is gone are removed
(:func:`remove_orphans`), whatever their age. Low in the layers: it imports nothing of opslib's.
"""

from __future__ import annotations

import glob
import os
import re
import socket
import tempfile
import time
import uuid
from pathlib import Path

PREFIX = "opslib-kernel-"
# Files from before the runner's pid was in the name: judged by their socket refusing connections.
LEGACY_STALE_S = 60.0
_OWNED = re.compile(rf"^{re.escape(PREFIX)}(\d+)-[0-9a-f]+-ipc")


# A Unix socket's path holds at most 107 bytes on Linux; a kernel's names add about 45 to their folder.
_SOCKET_PATH_MAX, _NAME_ROOM = 107, 48


def _folders() -> list[str]:
    """Where kernel files are made: the temporary folder, or /tmp when its path leaves too little room
    for a socket's name (a deep TMPDIR); both are looked at for orphans."""
    folder = tempfile.gettempdir()
    short = "/tmp" if os.path.isdir("/tmp") else folder
    usable = folder if len(os.fsencode(folder)) + _NAME_ROOM <= _SOCKET_PATH_MAX else short
    return list(dict.fromkeys([usable, folder, short]))


def new_prefix() -> str:
    """The path prefix of a new kernel's files (its sockets ``<prefix>-1``…, its connection file)."""
    return str(Path(_folders()[0]) / f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}-ipc")


def connection_file(prefix: str) -> str:
    """Where the kernel of ``prefix`` gets its connection file: beside its sockets, not in Jupyter's runtime folder."""
    return f"{prefix}-connection.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphans(older_than_s: float = LEGACY_STALE_S) -> list[str]:
    """Remove the kernel files of runners that are gone; returns what was removed. Never raises.

    Only this user's files are judged. Those named for a runner pid that is not alive go, unless one of
    the kernel's sockets still answers (its kernel outlived the runner for a moment, or the runner lives in
    another PID namespace sharing this folder). A file from an older opslib (no pid in its name) goes when
    nothing listens on it and it is older than ``older_than_s`` (a fresh one may belong to a kernel between
    its bind and its listen).
    """
    removed = []
    oldest = time.time() - older_than_s
    groups: dict[str, list[str]] = {}
    found = [path for folder in _folders() for path in glob.glob(os.path.join(glob.escape(folder), f"{PREFIX}*"))]
    for path in found:
        try:
            if os.lstat(path).st_uid != os.getuid():
                continue  # another user's: not ours to judge (and a sticky folder would refuse anyway)
        except OSError:
            continue
        name = os.path.basename(path)
        owned = _OWNED.match(name)
        if owned is not None:
            groups.setdefault(owned.group(0), []).append(path)
        elif "-ipc-" in name and _legacy_stale(path, oldest):
            removed += _unlinked([path])
    for stem, paths in groups.items():
        pid = int(_OWNED.match(stem).group(1))
        if not _alive(pid) and not any(_answers(path) for path in paths):
            removed += _unlinked(paths)
    return removed


def _unlinked(paths: list[str]) -> list[str]:
    done = []
    for path in paths:
        try:
            Path(path).unlink(missing_ok=True)
        except OSError:
            continue
        done.append(path)
    return done


def _probe(path: str) -> bool | None:
    """Whether something listens on the socket ``path``: True, False (refused, or gone), or None when it
    cannot be judged (not a socket, no permission)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.2)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return None
    finally:
        probe.close()
    return True


def _answers(path: str) -> bool:
    """Whether something listens on ``path`` (a regular file never does)."""
    return _probe(path) is True


def _legacy_stale(path: str, oldest: float) -> bool:
    """Whether an unowned kernel socket is older than ``oldest`` and refuses connections (one it cannot
    judge is left alone)."""
    try:
        if os.lstat(path).st_mtime > oldest:
            return False
    except OSError:
        return False
    return _probe(path) is False
