"""Taking a backup: pg_dump of the target database, and the manifest written beside it.

Per-table row counts and the Alembic revision are read in the very snapshot pg_dump dumps
(``pg_export_snapshot`` + ``pg_dump --snapshot``), so a restore can be checked against them. The dump
is written under a partial name (:mod:`opslib.backup.partials`) and renamed only once complete and
checksummed, with its manifest beside it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError

from opslib import __version__, db, pgtools
from opslib.backup.manifest import (
    MANIFEST_FORMAT,
    _iso,
    _now,
    _write_json,
    manifest_path,
    row_counts,
    sha256_of,
)
from opslib.backup.partials import _claim_partial, _final_stem, _partial_of, remove_stale_partials
from opslib.backup.programs import _exit_text, _last_line, _wait_for_dump
from opslib.config import Settings
from opslib.errors import BackupNotTaken, OpsError
from opslib.redact import clean


def _endpoint(url: URL) -> dict:
    host = url.host or url.query.get("host")
    return {"host": host if isinstance(host, str) else None, "port": url.port, "name": url.database}


@dataclass(frozen=True)
class BackupResult:
    """A finished backup: the archive, its manifest, and what the manifest says."""

    path: Path
    manifest: dict

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {"path": str(self.path), "manifest_path": str(manifest_path(self.path)), **self.manifest}


def backup(where: Settings | db.TargetDatabase, *, out_dir: Path | None = None, label: str | None = None) -> BackupResult:
    """Dump the target database with the pg_dump that fits its server, and write its manifest.

    The dump, the revision and the row counts come from one snapshot. pg_dump starts first; where the
    project keeps its revision (its env.py says) is learned, and the revision and the counts are read
    inside that snapshot, while it works.
    A backup that cannot be taken (pg_dump fails, a full disk, a folder that cannot be written) is
    :class:`BackupNotTaken` (exit 3): the database was only read, and no file is left under a
    final name. Partial dumps of killed backups in the folder are removed first.
    """
    target = db.TargetDatabase.of(where)  # resolved once: the URL every step of it uses
    settings = target.settings
    folder = Path(out_dir or settings.backups_dir)
    label = clean(label) if label is not None else None  # `--label "$DATABASE_URL"` keeps no password
    _make_folder(folder)
    url = target.url
    started = _now()
    remove_stale_partials(folder, started)
    with db.connect(url) as conn:
        dumped = _dump_in_one_snapshot(settings, conn, url, folder, started)
    return _seal(settings, url, folder, started, dumped, label)


def _make_folder(folder: Path) -> None:
    """Create the backups folder; one that cannot be created is :class:`BackupNotTaken`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BackupNotTaken(
            f"cannot create the backups folder {folder}: {err.strerror or err}; no backup was taken: "
            "choose a writable folder with --out or OPSLIB_BACKUPS_DIR"
        ) from None


@dataclass(frozen=True)
class _Dump:
    """A pg_dump that has ended, and what was read in its snapshot; ``lock`` still holds its partial file."""

    version: str
    major: int
    tool: pgtools.ClientTool
    stamped: datetime
    lock: int
    partial: Path
    proc: subprocess.Popen
    stderr: str
    where: tuple[str | None, str]
    revisions: list[str]
    counts: dict[str, int]


def _dump_in_one_snapshot(
    settings: Settings, conn: Connection, url: URL, folder: Path, started: datetime
) -> _Dump:
    """Run pg_dump in a snapshot exported from ``conn`` while the revision and the row counts are read in it.

    The partial file is claimed here (see :func:`_claim_partial`). Whatever stops the dump, pg_dump is
    killed, its partial file removed and its lock let go; a database error or a pg_dump that cannot be
    run is :class:`BackupNotTaken`.
    """
    version, major = db.server_version(conn)
    tool = pgtools.pg_dump_for(major)
    snap = conn.execution_options(isolation_level="REPEATABLE READ")
    with snap.begin():
        snap.execute(sa.text("SET TRANSACTION READ ONLY"))
        # Counting waits behind the same locks pg_dump does, and gives up as pg_dump does.
        snap.execute(sa.text(f"SET LOCAL lock_timeout = '{int(settings.lock_timeout_s * 1000)}ms'"))
        snapshot = snap.execute(sa.text("SELECT pg_export_snapshot()")).scalar()
        stamped, lock = _claim_partial(folder, url.database, started)
        partial = _partial_of(folder, url.database, stamped)
        proc = None
        reading = "the revision"  # what a database error interrupted, for its message
        errors = tempfile.TemporaryFile(mode="w+")  # pg_dump's stderr: read once it has ended
        try:
            proc = _start_pg_dump(settings, tool, url, snapshot, partial, lock, errors)
            # Where the project keeps its revision comes from its env.py, run offline: 0.1 s a
            # backup (measured: 0.06 s of work, waited for in tenths of a second), spent before
            # pg_dump started until now. Here rather than in a thread of its own from the start:
            # the run redirects stdout, stderr and logging for the whole process, and swallowed
            # the error of a connection that failed meanwhile.
            where = _project_version_table(settings, url)
            revisions = list(db.version_revisions(snap, where))
            reading = "the row counts"
            counts = row_counts(snap)
            _wait_for_dump(proc)
            errors.seek(0)
            stderr = errors.read()
            errors.close()
        except BaseException as err:
            if proc is not None:
                proc.kill()
                proc.wait()
            partial.unlink(missing_ok=True)
            os.close(lock)
            errors.close()
            if isinstance(err, DBAPIError):
                raise BackupNotTaken(
                    f"reading {reading} for the manifest failed: {db.driver_message(err, url)}; "
                    "no backup was written"
                ) from None
            if isinstance(err, OSError):
                raise BackupNotTaken(
                    f"cannot run {tool.path}: {err.strerror or err}; no backup was written"
                ) from None
            raise
    return _Dump(version, major, tool, stamped, lock, partial, proc, stderr, where, revisions, counts)


def _start_pg_dump(
    settings: Settings, tool: pgtools.ClientTool, url: URL, snapshot: str, partial: Path, lock: int, errors
) -> subprocess.Popen:
    """pg_dump of ``snapshot`` into ``partial``, started, its stderr into the file ``errors``."""
    return subprocess.Popen(
        [
            tool.path,
            "--format=custom",
            f"--compress={settings.backup_compression}",
            f"--snapshot={snapshot}",
            f"--lock-wait-timeout={int(settings.lock_timeout_s * 1000)}",
            "--no-password",
            f"--file={partial}",
        ],
        env=pgtools.libpq_env(url),
        stdout=subprocess.DEVNULL,
        stderr=errors,
        text=True,
        pass_fds=(lock,),  # pg_dump holds the partial file's lock too, while it writes
        **pgtools.child_options(),
    )


def _seal(
    settings: Settings, url: URL, folder: Path, started: datetime, dumped: _Dump, label: str | None
) -> BackupResult:
    """Write the manifest of an ended pg_dump and rename the dump to its final name.

    A pg_dump that failed, or a write that failed, is :class:`BackupNotTaken` and leaves neither file
    under a final name. The partial file's lock is let go however this ends.
    """
    final = folder / f"{_final_stem(url.database, dumped.stamped, '+'.join(dumped.revisions) or 'base')}.dump"
    try:
        if dumped.proc.returncode != 0:
            raise BackupNotTaken(
                f"pg_dump {_exit_text(dumped.proc.returncode)}: {_last_line(dumped.stderr, url)}; no backup was written"
            )
        finished = _now()
        try:
            manifest = _manifest(settings, url, final, dumped, label, started, finished)
            _write_json(manifest_path(final), manifest)
            os.replace(dumped.partial, final)
        except OSError as err:
            raise BackupNotTaken(
                f"cannot write the backup {final.name} in {folder}: {err.strerror or err}; no backup was written"
            ) from None
    except BaseException:
        dumped.partial.unlink(missing_ok=True)
        manifest_path(final).unlink(missing_ok=True)
        raise
    finally:
        os.close(dumped.lock)
    return BackupResult(final, manifest)


def _manifest(
    settings: Settings,
    url: URL,
    final: Path,
    dumped: _Dump,
    label: str | None,
    started: datetime,
    finished: datetime,
) -> dict:
    """The manifest of the dump to be named ``final`` (its checksum read here: an OSError is the caller's)."""
    return {
        "format": MANIFEST_FORMAT,
        "file": final.name,
        "sha256": sha256_of(dumped.partial),
        "size_bytes": dumped.partial.stat().st_size,
        "database": _endpoint(url),
        "server_version": dumped.version,
        "server_major": dumped.major,
        "pg_dump": {"path": dumped.tool.path, "version": dumped.tool.version, "major": dumped.tool.major},
        "compression": settings.backup_compression,
        "revisions": dumped.revisions,
        "version_table": {"schema": dumped.where[0], "table": dumped.where[1]},
        "row_counts": dumped.counts,
        "env": settings.env,
        "label": label,
        "operator": settings.operator,
        "host": socket.gethostname(),
        "opslib_version": __version__,
        "started_at": _iso(started),
        "finished_at": _iso(finished),
        "duration_s": round((finished - started).total_seconds(), 3),
    }


def _project_version_table(settings: Settings, url: URL) -> tuple[str | None, str]:
    """Where the project keeps its revision (its env.py's ``version_table``), for the manifest.

    Learning it loads the Alembic project (a backup otherwise reads revisions with plain SQL); a
    database backed up without its project uses Alembic's default table.
    """
    from opslib import migrate  # same layer; Alembic is imported only here, for backups

    try:
        return migrate.version_table(settings, url=url)
    except OpsError:
        return db.DEFAULT_VERSION_TABLE
