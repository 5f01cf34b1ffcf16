"""Cloning the target on its server with ``CREATE DATABASE … TEMPLATE``, and the copy strategy it uses."""

from __future__ import annotations

import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from opslib import db
from opslib.config import Settings
from opslib.errors import BackupFailed, PreconditionFailed


@dataclass(frozen=True)
class CloneResult:
    """A copy of the target database made on the same server."""

    source: str
    database: str
    duration_s: float
    # How PostgreSQL copied it: "WAL_LOG" or "FILE_COPY" (15 and later), None before 15 (no choice there).
    strategy: str | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {
            "source": self.source,
            "database": self.database,
            "duration_s": self.duration_s,
            "strategy": self.strategy,
        }


# From this source size on, a clone copies the files (STRATEGY FILE_COPY) instead of writing every
# block through the WAL (WAL_LOG, PostgreSQL 15's default). Measured on PostgreSQL 15 (2 cores, a disk
# writing 400 MB/s with fdatasync; CREATE DATABASE alone after a CHECKPOINT, medians of 8-10): WAL_LOG
# costs about 0.06 s + 1.5 ms/MB, FILE_COPY 0.09 s + 0.45 ms/MB. They break even near 60 MB (0.147 s
# against 0.135 s at 61 MB); FILE_COPY takes 0.16 s against 0.20 s at 93 MB, 0.19 s against 0.37 s
# at 222 MB (benchmarks/bench_backup.py), 0.84 s against 1.64 s at 650 MB (medians of 4).
# FILE_COPY makes the server checkpoint before and after the copy, which on a busy server writes
# out everyone's dirty buffers: the line is drawn above the break-even, where the copy is clearly
# cheaper, rather than at it.
FILE_COPY_FROM_BYTES = 100 * 1024 * 1024


def clone_strategy(major: int, source_bytes: int) -> str | None:
    """The ``CREATE DATABASE … STRATEGY`` for a clone of a source this large: None before PostgreSQL 15,
    which has no such clause; FILE_COPY from :data:`FILE_COPY_FROM_BYTES` on, else WAL_LOG."""
    if major < 15:
        return None
    return "FILE_COPY" if source_bytes >= FILE_COPY_FROM_BYTES else "WAL_LOG"


def clone(where: Settings | db.TargetDatabase, into: str) -> CloneResult:
    """Copy the target database on its server with ``CREATE DATABASE … TEMPLATE`` (no dump, no restore).

    On PostgreSQL 15 and later a large source is copied file by file (``STRATEGY FILE_COPY``), a
    small one through the WAL (``WAL_LOG``): see :data:`FILE_COPY_FROM_BYTES`. PostgreSQL refuses
    while anyone else is connected to the source; that is reported as a refusal.
    """
    target = db.TargetDatabase.of(where)  # resolved once: the URL every step of it uses
    db.check_database_name(into)
    url = target.url
    source = url.database
    with db.connect_autocommit(db.maintenance_url(url)) as admin:
        if db.database_exists(admin, into):
            raise PreconditionFailed(f"database {into!r} already exists: choose another name for the clone")
        sessions = db.other_sessions(admin, source)
        if sessions:
            raise PreconditionFailed(_busy_source(source, sessions))
        _, major = db.server_version(admin)
        strategy = clone_strategy(major, _database_bytes(admin, source)) if major >= 15 else None
        sql = f"CREATE DATABASE {db.quote_ident(admin, into)} TEMPLATE {db.quote_ident(admin, source)}"
        start = time.perf_counter()
        try:
            admin.execute(sa.text(sql + (f" STRATEGY {strategy}" if strategy else "")))
        except DBAPIError as err:
            if "being accessed by other users" in str(err.orig):
                raise PreconditionFailed(_busy_source(source, db.other_sessions(admin, source))) from None
            raise BackupFailed(f"clone of {source!r} failed: {db.driver_message(err, url)}") from None
    return CloneResult(source, into, round(time.perf_counter() - start, 3), strategy)


def _database_bytes(admin: Connection, name: str) -> int:
    """The size of database ``name`` on disk; 0 when it may not be read (the default strategy then)."""
    try:
        return int(admin.execute(sa.text("SELECT pg_database_size(:n)"), {"n": name}).scalar() or 0)
    except DBAPIError:  # pg_database_size needs CONNECT on the database (or pg_read_all_stats)
        return 0


def _busy_source(source: str, sessions: list[int]) -> str:
    pids = ", ".join(map(str, sessions[:5])) or "just connected"
    return (
        f"cannot clone {source!r} while other sessions are connected to it (pids {pids}): "
        "CREATE DATABASE … TEMPLATE needs it idle; close them, or use `opslib backup` and `opslib restore`"
    )
