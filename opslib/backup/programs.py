"""The client programs a backup runs (pg_dump, pg_restore): waited for, and their failures told.

Client programs die with opslib (:func:`pgtools.child_options`).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path

from sqlalchemy.engine import URL

from opslib import db, pgtools
from opslib.errors import Interrupted
from opslib.signals import signals_noted


def _wait_for_dump(proc: subprocess.Popen) -> None:
    """Wait for pg_dump; SIGINT or SIGTERM stops the backup (:class:`Interrupted`, pg_dump then killed by
    the caller). The signal is only noted while waiting: raised inside ``subprocess``'s own bookkeeping,
    it could leave that broken."""
    with signals_noted() as caught:
        _wait_for_exit(proc, caught)
    if caught:
        raise Interrupted(caught[0])


def _wait_for_exit(proc: subprocess.Popen, caught: list[int]) -> None:
    """Return once ``proc`` has ended (reaped), or a signal is noted in ``caught`` (looked at every 50 ms).

    On Linux the wait ends the moment the program exits (a pidfd becomes readable); sleeping 50 ms
    between polls added 25 ms to each backup on average, 50 ms to a small one. Elsewhere it polls.
    """
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux 5.3+, or no descriptor left
        while proc.poll() is None and not caught:
            time.sleep(0.05)
        return
    try:
        # A noted signal interrupts select, which Python resumes after the handler: hence the timeout.
        while not caught and not select.select([pidfd], [], [], 0.05)[0]:
            pass
    finally:
        os.close(pidfd)
    proc.poll()


def _exit_text(code: int) -> str:
    if code >= 0:
        return f"exited with status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"was killed by signal {-code}"
    # SIGXFSZ: the file grew past the size limit (ulimit -f); say so, pg_dump itself says nothing.
    why = ", the file size limit (ulimit -f) was reached" if name == "SIGXFSZ" else ""
    return f"was killed by signal {-code} ({name}{why})"


def _last_line(stderr: str, url: URL) -> str:
    lines = [line.strip() for line in (stderr or "").splitlines() if line.strip()]
    return db.scrub(lines[-1], url) if lines else "no message"


def _pg_restore(url: URL, server_major: int, path: Path, extra: list[str]) -> str | None:
    """Restore ``path`` into the (existing, empty) database of ``url``; the error line, or None."""
    tool = pgtools.pg_restore_for(server_major)
    done = subprocess.run(
        [tool.path, "--exit-on-error", "--no-password", f"--dbname={url.database}", *extra, str(path)],
        env=pgtools.libpq_env(url),
        capture_output=True,
        text=True,
        **pgtools.child_options(),
    )
    return (
        None
        if done.returncode == 0
        else f"pg_restore {_exit_text(done.returncode)}: {_last_line(done.stderr, url)}"
    )
