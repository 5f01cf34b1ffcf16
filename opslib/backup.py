"""Backups an operator can trust: pg_dump archives with manifests, verification, restore and clone.

A backup is ``<database>_<UTC yyyymmddTHHMMSSZ>_<revision>.dump`` (pg_dump custom format) with a
``.json`` manifest beside it (the design's backup contract). Both are written under temporary names
and renamed only once complete and checksummed, so an interrupted backup never leaves a file under a
final name. Per-table row counts and the Alembic revision are read in the very snapshot pg_dump
dumps (``pg_export_snapshot`` + ``pg_dump --snapshot``), so a restore can be checked against them.

A verification's outcome is kept in ``<stem>.verify.json``: the manifest itself is never rewritten.

What a killed run leaves is cleaned up by the next one: a backup removes the partial dumps no live
writer holds (each writer holds an ``flock`` on its partial file, and its pg_dump inherits it), and a
restore over the target drops the staging databases no running restore holds (each holds an advisory
lock named after its staging database). Client programs die with opslib (:func:`pgtools.child_options`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import select
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError

from opslib import __version__, db, pgtools
from opslib.checkreport import FAIL, PASS, SKIP, CheckReport
from opslib.config import Settings
from opslib.errors import (
    BackupFailed,
    BackupNotTaken,
    Interrupted,
    InvalidInput,
    OpsError,
    PreconditionFailed,
)
from opslib.redact import clean, clean_json
from opslib.signals import signals_noted

MANIFEST_FORMAT = "opslib-backup/1"
STAMP = "%Y%m%dT%H%M%SZ"
_CHUNK = 1 << 20


# --- files ---------------------------------------------------------------------------------------


def manifest_path(dump: Path) -> Path:
    """The manifest beside a backup file."""
    return dump.with_suffix(".json")


def verification_path(dump: Path) -> Path:
    """Where the outcome of the last verification of a backup is kept."""
    return dump.with_suffix(".verify.json")


def sha256_of(path: Path, stop: threading.Event | None = None) -> str:
    """The hex sha256 of a file, read in chunks; given up (an empty string) once ``stop`` is set."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            if stop is not None and stop.is_set():
                return ""
            digest.update(chunk)
    return digest.hexdigest()


class _Background:
    """``fn(*args)`` run in a thread while the caller does other work; :meth:`result` waits for it.

    For work that leaves the GIL to others, such as hashing (hashlib lets go of it while it hashes).
    What ``fn`` raised is raised by :meth:`result`. The thread is a daemon: a caller that leaves
    early does not wait for it.
    """

    def __init__(self, fn, *args, name: str):
        self.value: object = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, args), name=name, daemon=True)
        self.thread.start()

    def _run(self, fn, args) -> None:
        try:
            self.value = fn(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the caller by result()
            self.error = err

    def result(self):
        """What ``fn`` returned, once it has."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-._" else "-" for ch in text)


def _write_json(path: Path, data: dict) -> None:
    """Write JSON under a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_text(json.dumps(clean_json(data, frozenset({"label", "error"})), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # a full disk must not also leave half a file behind
        raise


def read_manifest(dump: Path) -> dict:
    """The manifest of a backup; a missing or unreadable one is :class:`PreconditionFailed`."""
    path = manifest_path(dump)
    if not path.is_file():
        raise PreconditionFailed(f"missing manifest: {path.name} is not beside {dump.name}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PreconditionFailed(f"unreadable manifest {path.name}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise PreconditionFailed(f"{path.name} is not an opslib backup manifest ({MANIFEST_FORMAT})")
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise PreconditionFailed(f"manifest {path.name} lacks {', '.join(missing)}")
    return manifest


_REQUIRED = ("file", "sha256", "size_bytes", "database", "pg_dump", "revisions", "row_counts", "started_at")


# --- reading a database ------------------------------------------------------------------------------


def row_counts(conn: Connection) -> dict[str, int]:
    """Exact row counts of every ordinary table outside the system schemas, keyed ``schema.table``."""
    tables = conn.execute(
        sa.text(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' ORDER BY 1, 2"
        )
    ).all()
    counts = {}
    for schema, table in tables:
        qualified = f"{db.quote_ident(conn, schema)}.{db.quote_ident(conn, table)}"
        counts[f"{schema}.{table}"] = int(conn.execute(sa.text(f"SELECT count(*) FROM {qualified}")).scalar())
    return counts


def _endpoint(url: URL) -> dict:
    host = url.host or url.query.get("host")
    return {"host": host if isinstance(host, str) else None, "port": url.port, "name": url.database}


# --- backup --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupResult:
    """A finished backup: the archive, its manifest, and what the manifest says."""

    path: Path
    manifest: dict

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {"path": str(self.path), "manifest_path": str(manifest_path(self.path)), **self.manifest}


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


def backup(settings: Settings, *, out_dir: Path | None = None, label: str | None = None) -> BackupResult:
    """Dump the target database with the pg_dump that fits its server, and write its manifest.

    The dump, the revision and the row counts come from one snapshot. pg_dump starts first; where the
    project keeps its revision (its env.py says) is learned, and the revision and the counts are read
    inside that snapshot, while it works.
    A backup that cannot be taken (pg_dump fails, a full disk, a folder that cannot be written) is
    :class:`BackupNotTaken` (exit 3): the database was only read, and no file is left under a
    final name. Partial dumps of killed backups in the folder are removed first.
    """
    folder = Path(out_dir or settings.backups_dir)
    label = clean(label) if label is not None else None  # `--label "$DATABASE_URL"` keeps no password
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BackupNotTaken(
            f"cannot create the backups folder {folder}: {err.strerror or err}; no backup was taken: "
            "choose a writable folder with --out or OPSLIB_BACKUPS_DIR"
        ) from None
    url = db.target_url(settings)
    started = _now()
    remove_stale_partials(folder, started)
    with db.connect(url) as conn:
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
                proc = subprocess.Popen(
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
                # Where the project keeps its revision comes from its env.py, run offline: 0.1 s a
                # backup (measured: 0.06 s of work, waited for in tenths of a second), spent before
                # pg_dump started until now. Here rather than in a thread of its own from the start:
                # the run redirects stdout, stderr and logging for the whole process, and swallowed
                # the error of a connection that failed meanwhile.
                where = _project_version_table(settings)
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
    final = folder / f"{_final_stem(url.database, stamped, '+'.join(revisions) or 'base')}.dump"
    try:
        if proc.returncode != 0:
            raise BackupNotTaken(
                f"pg_dump {_exit_text(proc.returncode)}: {_last_line(stderr, url)}; no backup was written"
            )
        finished = _now()
        try:
            manifest = {
                "format": MANIFEST_FORMAT,
                "file": final.name,
                "sha256": sha256_of(partial),
                "size_bytes": partial.stat().st_size,
                "database": _endpoint(url),
                "server_version": version,
                "server_major": major,
                "pg_dump": {"path": tool.path, "version": tool.version, "major": tool.major},
                "compression": settings.backup_compression,
                "revisions": revisions,
                "version_table": {"schema": where[0], "table": where[1]},
                "row_counts": counts,
                "env": settings.env,
                "label": label,
                "operator": settings.operator,
                "host": socket.gethostname(),
                "opslib_version": __version__,
                "started_at": _iso(started),
                "finished_at": _iso(finished),
                "duration_s": round((finished - started).total_seconds(), 3),
            }
            _write_json(manifest_path(final), manifest)
            os.replace(partial, final)
        except OSError as err:
            raise BackupNotTaken(
                f"cannot write the backup {final.name} in {folder}: {err.strerror or err}; no backup was written"
            ) from None
    except BaseException:
        partial.unlink(missing_ok=True)
        manifest_path(final).unlink(missing_ok=True)
        raise
    finally:
        os.close(lock)
    return BackupResult(final, manifest)


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


# --- verify ----------------------------------------------------------------------------------------


def _project_version_table(settings: Settings) -> tuple[str | None, str]:
    """Where the project keeps its revision (its env.py's ``version_table``), for the manifest.

    Learning it loads the Alembic project (a backup otherwise reads revisions with plain SQL); a
    database backed up without its project uses Alembic's default table.
    """
    from opslib import migrate  # same layer; Alembic is imported only here, for backups

    try:
        return migrate.version_table(settings)
    except OpsError:
        return db.DEFAULT_VERSION_TABLE


def _manifest_version_table(manifest: dict) -> tuple[str | None, str]:
    """The version table a backup was read from (manifests before it was recorded: Alembic's default)."""
    where = manifest.get("version_table") or {}
    return (where.get("schema"), where.get("table") or db.DEFAULT_VERSION_TABLE[1])


def _backup_file(file: Path | str) -> Path:
    path = Path(file)
    if not path.is_file():
        raise InvalidInput(f"no backup file at {path}")
    return path


def verify_backup(
    settings: Settings, file: Path | str, *, restore_test: bool = False, record: bool = True
) -> CheckReport:
    """Check a backup: manifest, size, sha256, a readable archive, and optionally a test restore.

    Checks stop at the first failure (the rest are skipped). Unless ``record`` is False, the outcome
    is recorded beside the backup (``<stem>.verify.json``) for ``opslib backups``.
    """
    path = _backup_file(file)
    report = CheckReport(f"verify-backup {path.name}")
    names = ["manifest", "size", "sha256", "archive readable"] + (["restore test"] if restore_test else [])
    try:
        _verify(settings, path, report, restore_test)
    except OpsError as err:  # e.g. no fitting pg_restore, or the server went away mid-test
        report.add(names[len(report.checks)], FAIL, err.message)
    for name in names[len(report.checks) :]:
        report.add(name, SKIP, "an earlier check failed")
    if record:
        _write_json(
            verification_path(path),
            {
                "file": path.name,
                "verified_at": _iso(_now()),
                "restore_test": restore_test,
                **report.to_dict(),
            },
        )
    return report


def _verify(settings: Settings, path: Path, report: CheckReport, restore_test: bool) -> None:
    try:
        manifest = read_manifest(path)
    except PreconditionFailed as err:
        report.add("manifest", FAIL, err.message)
        return
    if manifest.get("file") != path.name:
        report.add(
            "manifest",
            FAIL,
            f"manifest of another file: it describes {manifest.get('file')}, not {path.name}",
        )
        return
    report.add("manifest", PASS, manifest_path(path).name)
    size, expected = path.stat().st_size, manifest.get("size_bytes")
    if size != expected:
        what = "truncated" if size < (expected or 0) else "larger than recorded"
        report.add("size", FAIL, f"{what}: {size} bytes, the manifest says {expected}")
        return
    report.add("size", PASS, f"{size} bytes")
    # The checksum, the archive's listing and the scratch database of a restore test do not depend on
    # one another: they are under way at once (measured: hashing 60 MB 0.05-0.07 s, listing 0.01 s,
    # connecting and creating the database 0.07-0.1 s), and judged in order. Nothing is restored
    # before the checksum and the listing have passed.
    stop = threading.Event()  # set on leaving: a digest no longer wanted is not finished
    hashing = _Background(sha256_of, path, stop, name="opslib-sha256")
    with contextlib.ExitStack() as stack:
        stack.callback(stop.set)
        listing = _start_listing(manifest, path)
        if not isinstance(listing, Exception):
            stack.callback(_end, listing[1])
        scratch = stack.enter_context(_scratch_database(db.target_url(settings))) if restore_test else None
        digest = hashing.result()
        if digest != manifest.get("sha256"):
            report.add(
                "sha256",
                FAIL,
                f"checksum mismatch: {digest[:16]}…, the manifest says {str(manifest.get('sha256'))[:16]}…",
            )
            return
        report.add("sha256", PASS, digest[:16] + "…")
        if isinstance(listing, Exception):
            raise listing  # e.g. no fitting pg_restore: the archive-readable check's failure
        reader, proc = listing
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            report.add("archive readable", FAIL, f"unreadable archive: {_last_line(stderr, None)}")
            return
        entries = sum(1 for line in stdout.splitlines() if line and not line.startswith(";"))
        report.add("archive readable", PASS, f"{entries} entries listed by pg_restore {reader.version}")
        if scratch is not None:
            report.add("restore test", *_restore_test(scratch, path, manifest))


def _start_listing(manifest: dict, path: Path) -> tuple[pgtools.ClientTool, subprocess.Popen] | Exception:
    """``pg_restore --list`` of the archive, started; or what stopped it from starting, to be raised in turn."""
    try:
        reader = pgtools.pg_restore_for(int(manifest["pg_dump"]["major"]))
        return reader, subprocess.Popen(
            [reader.path, "--list", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **pgtools.child_options(),
        )
    except Exception as err:  # noqa: BLE001 - raised by the caller when the listing's turn comes
        return err


def _end(proc: subprocess.Popen) -> None:
    """Kill a client program the caller no longer waits for (it left early), and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


@dataclass(frozen=True)
class _Scratch:
    """The empty database a restore test restores into; ``problem`` is why it could not be made."""

    url: URL
    major: int
    problem: OpsError | None = None


@contextlib.contextmanager
def _scratch_database(url: URL) -> Iterator[_Scratch]:
    """A new, empty database on ``url``'s server for a restore test, dropped on leaving the block.

    A failure to make it is not raised here: it is kept in ``problem`` and reported at the restore
    test's turn, after the checks before it.
    """
    name = f"opslib_verify_{secrets.token_hex(5)}"
    with contextlib.ExitStack() as stack:
        problem, major = None, 0
        try:
            admin = stack.enter_context(db.connect_autocommit(db.maintenance_url(url)))
            _, major = db.server_version(admin)
            admin.execute(sa.text(f"CREATE DATABASE {db.quote_ident(admin, name)}"))
        except OpsError as err:
            problem = err
        except DBAPIError as err:  # no CREATEDB privilege, say
            problem = BackupFailed(f"cannot create a scratch database: {db.driver_message(err, url)}")
        else:
            stack.callback(
                admin.execute, sa.text(f"DROP DATABASE IF EXISTS {db.quote_ident(admin, name)} WITH (FORCE)")
            )
        yield _Scratch(url.set(database=name), major, problem)


def _restore_test(scratch: _Scratch, path: Path, manifest: dict) -> tuple[str, str]:
    if scratch.problem is not None:
        raise scratch.problem
    # Owners and grants may name roles this server lacks; the data is what is being tested.
    failure = _pg_restore(scratch.url, scratch.major, path, ["--no-owner", "--no-privileges"])
    if failure:
        return FAIL, f"restore into a scratch database failed: {failure}"
    with db.connect(scratch.url) as conn:
        counts = row_counts(conn)
        revisions = list(db.version_revisions(conn, _manifest_version_table(manifest)))
    diff = _count_differences(manifest.get("row_counts", {}), counts)
    if diff:
        return FAIL, f"count mismatch: {diff}"
    if sorted(revisions) != sorted(manifest.get("revisions", [])):
        return (
            FAIL,
            f"revision mismatch: restored {revisions or 'base'}, the manifest says {manifest.get('revisions') or 'base'}",
        )
    total = sum(counts.values())
    return (
        PASS,
        f"{len(counts)} tables, {total} rows and revision {'+'.join(revisions) or 'base'} as in the manifest",
    )


def _count_differences(expected: dict[str, int], actual: dict[str, int]) -> str:
    diffs = [
        f"{table}: {actual.get(table, 'missing')} rows, expected {expected.get(table, 'none')}"
        for table in sorted(set(expected) | set(actual))
        if expected.get(table) != actual.get(table)
    ]
    return "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")


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


# --- restore ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreResult:
    """Where a backup was restored, and whether it matches its manifest."""

    file: Path
    database: str
    revisions: tuple[str, ...]
    row_counts: dict
    matches_manifest: bool
    replaced_database_kept_as: str | None = None
    # Staging databases that killed restores over the target left, dropped before this restore.
    removed_leftovers: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {
            "file": str(self.file),
            "database": self.database,
            "revisions": list(self.revisions),
            "matches_manifest": self.matches_manifest,
            "replaced_database_kept_as": self.replaced_database_kept_as,
            "removed_leftovers": list(self.removed_leftovers),
        }


def restore(
    settings: Settings,
    file: Path | str,
    *,
    into: str | None = None,
    confirm: str | None = None,
    terminate_connections: bool = False,
    allow_other_database: bool = False,
) -> RestoreResult:
    """Restore a verified backup into a new database, or over the target database when confirmed.

    Over the target, the backup is first restored into a staging database and checked; only then
    is the target renamed aside (kept, never dropped) and the staging database renamed into its
    place, both renames in one transaction. A failure at any point, or a kill, leaves the target as
    it was. A backup of another database is restored over the target only with
    ``allow_other_database``. Staging databases that killed restores of the target left are dropped
    first (see :func:`cleanup_restores`).
    """
    path = _backup_file(file)
    # The archive is checked first (not recorded: a restore-tested verification stays on record).
    verify_backup(settings, path, record=False).raise_for_failure()
    manifest = read_manifest(path)
    url = db.target_url(settings)
    target = url.database
    if into is None:
        into = (
            target
            if confirm is not None
            else f"{manifest['database']['name']}_restored_{_now().strftime(STAMP).lower()}"[:63]
        )
    db.check_database_name(into)
    stamp = _now().strftime(STAMP).lower()
    with db.connect_autocommit(db.maintenance_url(url)) as admin:
        _, major = db.server_version(admin)
        exists = db.database_exists(admin, into)
        over = exists and into == target
        if exists and not over:
            raise PreconditionFailed(
                f"database {into!r} already exists: restore into a new name with --into, "
                f"or over the target database {target!r} with --confirm {target}"
            )
        removed: tuple[str, ...] = ()
        if over:
            _check_confirmed(target, confirm)
            _check_same_database(manifest, path, target, allow_other_database)
            _check_sessions(admin, target, terminate_connections)
            try:
                removed = _drop_leftovers(admin, target).dropped
            except DBAPIError:
                pass  # the clean-up is a courtesy: it never stops a restore (`opslib check` names leftovers)
        staging = _staging_name(into) if over else into
        # Held from before the staging database exists until it is renamed or dropped: a clean-up
        # (another restore's, or `restore --cleanup`) never drops a staging database in use.
        if over and not _lock_staging(admin, staging):
            raise PreconditionFailed(
                f"staging database name {staging!r} is in use by another restore: try again"
            )
        try:
            admin.execute(sa.text(f"CREATE DATABASE {db.quote_ident(admin, staging)}"))
        except BaseException:
            if over:
                _unlock_staging(admin, staging)
            raise
        try:
            failure = _pg_restore(url.set(database=staging), major, path, [])
            if failure:
                raise BackupFailed(
                    f"restore of {path.name} failed: {failure}; " + _untouched(over, target, into)
                )
            with db.connect(url.set(database=staging)) as conn:
                counts = row_counts(conn)
                revisions = db.version_revisions(conn, _manifest_version_table(manifest))
            matches = not _count_differences(manifest["row_counts"], counts) and sorted(revisions) == sorted(
                manifest["revisions"]
            )
            if not matches:
                raise BackupFailed(
                    f"the restored data does not match the manifest of {path.name}; "
                    + _untouched(over, target, into)
                )
            if over:
                _carry_over_properties(admin, target, staging)
            kept_as = _swap_in(url, admin, staging, target, stamp, terminate_connections) if over else None
        except BaseException:
            admin.execute(sa.text(f"DROP DATABASE IF EXISTS {db.quote_ident(admin, staging)} WITH (FORCE)"))
            raise
        finally:
            if over:
                _unlock_staging(admin, staging)
    return RestoreResult(path, into, revisions, counts, matches, kept_as, removed)


def _untouched(over: bool, target: str, into: str) -> str:
    return f"the target database {target!r} is unchanged" if over else f"database {into!r} was not created"


def _check_confirmed(target: str, confirm: str | None) -> None:
    """Replacing the target needs its name given back as ``confirm``."""
    if confirm != target:
        given = "without --confirm" if confirm is None else f"with --confirm {confirm!r}"
        raise PreconditionFailed(
            f"refusing to restore over database {target!r} {given}: pass --confirm {target} to replace it "
            "(it is kept under another name), or restore into a new database with --into NAME"
        )


def _check_sessions(admin: Connection, target: str, terminate: bool) -> None:
    """Other sessions on the target block the swap, unless they are to be terminated."""
    sessions = db.other_sessions(admin, target)
    if sessions and not terminate:
        raise PreconditionFailed(
            f"{len(sessions)} other session(s) are connected to {target!r} (pids {', '.join(map(str, sessions[:5]))}): "
            "stop them, or pass --terminate-connections"
        )


def _check_same_database(manifest: dict, path: Path, target: str, allow_other: bool) -> None:
    """Refuse to replace the target with a backup of another database, unless asked to."""
    source = (manifest.get("database") or {}).get("name")
    if source != target and not allow_other:
        raise PreconditionFailed(
            f"{path.name} is a backup of database {source!r}, not of the target {target!r}: pass "
            f"--allow-other-database to restore it over {target!r} anyway, or restore it into a new "
            "database with --into NAME"
        )


_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def _carry_over_properties(admin: Connection, source: str, dest: str) -> None:
    """Give ``dest`` the owner and the database-level settings of ``source``.

    The restored database was created by the connecting role; the database it replaces may belong to
    another (the application's) and carry settings of its own (``ALTER DATABASE … SET``, also per role).
    """
    q = lambda name: db.quote_ident(admin, name)  # noqa: E731
    owner = admin.execute(
        sa.text("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = :n"), {"n": source}
    ).scalar()
    admin.execute(sa.text(f"ALTER DATABASE {q(dest)} OWNER TO {q(owner)}"))
    rows = admin.execute(
        sa.text(
            "SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE pg_get_userbyid(s.setrole) END AS role, s.setconfig "
            "FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase WHERE d.datname = :n"
        ),
        {"n": source},
    ).all()
    for role, config in rows:
        for item in config or []:
            name, _, value = item.partition("=")
            if not _SETTING_NAME.match(name):
                continue
            # A list (search_path) is kept as PostgreSQL wrote it; a single value is quoted.
            text = value if "," in value else "'" + value.replace("'", "''") + "'"
            where = f"ROLE {q(role)} IN DATABASE {q(dest)}" if role else f"DATABASE {q(dest)}"
            # sa.text reads ":name" as a parameter: a colon in a value (a path, a time) is escaped.
            admin.execute(sa.text(f"ALTER {where} SET {name} = {text}".replace(":", "\\:")))


def _swap_in(url: URL, admin: Connection, staging: str, target: str, stamp: str, terminate: bool) -> str:
    """Rename the target aside and the staging database into its place; returns the name the old one has now.

    Both renames run in one transaction (PostgreSQL allows ``ALTER DATABASE … RENAME`` in a
    transaction block) and commit together or not at all: a failure of the second, or opslib killed
    between them, leaves the target under its name, never no database there at all.
    """
    kept = f"{target}_before_restore_{stamp}"[:63]
    q = lambda name: db.quote_ident(admin, name)  # noqa: E731
    # Not on ``admin``: it is in autocommit, where each ALTER would commit on its own.
    with db.connect(db.maintenance_url(url)) as swap:
        if swap.connection.dbapi_connection.autocommit:
            raise BackupFailed(
                "cannot swap the restored database in: the connection for the swap is in autocommit; "
                f"the target database {target!r} is unchanged"
            )
        if terminate:
            admin.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n AND pid <> pg_backend_pid()"
                ),
                {"n": target},
            )
        with swap.begin():
            try:
                swap.execute(sa.text(f"ALTER DATABASE {q(target)} RENAME TO {q(kept)}"))
            except DBAPIError as err:
                raise PreconditionFailed(
                    f"cannot set {target!r} aside: {db.driver_message(err)}; the target database is unchanged"
                ) from None
            try:
                swap.execute(sa.text(f"ALTER DATABASE {q(staging)} RENAME TO {q(target)}"))
            except DBAPIError as err:
                # Leaving the block rolls back the first rename with it.
                raise BackupFailed(
                    f"cannot rename the restored database into place: {db.driver_message(err)}; "
                    f"the target database {target!r} is unchanged"
                ) from None
    return kept


# --- leftovers of killed restores -------------------------------------------------------------------

_RESTORING = "_restoring_"
# The random part of a staging name; the target's name is cut so that the whole fits in 63 characters.
_STAGING_HEX = 6
_STAGING_KEEP = 63 - len(_RESTORING) - _STAGING_HEX


def staging_prefix(target: str) -> str:
    """How the staging databases of restores over ``target`` begin: ``<target>_restoring_``.

    A name longer than 46 characters is cut, so the random suffix survives PostgreSQL's 63-character
    limit and a leftover is still recognised.
    """
    return target[:_STAGING_KEEP] + _RESTORING


def _staging_name(target: str) -> str:
    return staging_prefix(target) + secrets.token_hex(_STAGING_HEX // 2)


def _staging_key(name: str) -> int:
    """The advisory-lock key a restore holds on its staging database's name, on the maintenance database."""
    digest = hashlib.sha256(f"opslib restore staging {name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _lock_staging(admin: Connection, name: str) -> bool:
    """Take the staging database's lock on ``admin`` (a session lock, so a killed process lets it go)."""
    got = admin.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": _staging_key(name)}).scalar()
    return bool(got)


def _unlock_staging(admin: Connection, name: str) -> None:
    try:
        admin.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _staging_key(name)})
    except DBAPIError:
        pass  # the connection is gone, and its session lock with it


@dataclass(frozen=True)
class StagingDatabase:
    """A staging database of a restore over the target: one running now, or one a killed restore left."""

    name: str
    in_use: bool  # a restore running now holds it
    sessions: int  # sessions connected to it now

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return dict(self.__dict__)


def staging_databases(conn: Connection, target: str) -> list[StagingDatabase]:
    """The staging databases of restores over ``target`` on ``conn``'s server, oldest name first.

    ``conn`` may be on any database of the server: the catalogs read are shared, and the locks are
    looked for in the maintenance database, where restores take them.
    """
    prefix = staging_prefix(target)
    maintenance = db.maintenance_url(conn.engine.url.set(database=target)).database
    rows = conn.execute(
        sa.text(
            "SELECT d.datname, "
            "(SELECT count(*) FROM pg_stat_activity a WHERE a.datname = d.datname) AS sessions "
            "FROM pg_database d WHERE left(d.datname, length(:p)) = :p ORDER BY d.oid"
        ),
        {"p": prefix},
    ).all()
    pattern = re.compile(re.escape(prefix) + f"[0-9a-f]{{{_STAGING_HEX}}}")
    found = []
    for name, sessions in rows:
        if not pattern.fullmatch(name):
            continue  # a database that merely looks alike: not opslib's to judge
        key = _staging_key(name)
        held = conn.execute(
            sa.text(
                "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
                "AND classid = (:key >> 32)::int::oid AND objid = (:key & 4294967295)::oid "
                "AND database = (SELECT oid FROM pg_database WHERE datname = :m)"
            ),
            {"key": key, "m": maintenance},
        ).first()
        found.append(StagingDatabase(name, held is not None, int(sessions)))
    if conn.in_transaction():
        conn.commit()
    return found


def leftover_restores(settings: Settings) -> list[StagingDatabase]:
    """The staging databases of restores over the target that no running restore holds (killed ones' debris)."""
    url = db.target_url(settings)
    with db.connect(url) as conn:
        try:
            return [s for s in staging_databases(conn, url.database) if not s.in_use]
        except DBAPIError as err:
            raise PreconditionFailed(
                f"cannot list the staging databases of {url.database!r}: {db.driver_message(err, url)}"
            ) from None


@dataclass(frozen=True)
class CleanupResult:
    """What `opslib restore --cleanup` did: the leftovers dropped, and those left, with why."""

    target: str
    dropped: tuple[str, ...]
    left: tuple[str, ...]  # "name (why)"

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {"target": self.target, "dropped": list(self.dropped), "left": list(self.left)}


def cleanup_restores(settings: Settings) -> CleanupResult:
    """Drop the staging databases that killed restores over the target left behind.

    One that a restore running now is using is never dropped: each restore holds an advisory lock
    named after its staging database from before creating it until it is renamed or dropped, a
    leftover is dropped only under that lock, and only when no session is connected to it (no
    ``FORCE``: someone looking into it is not cut off).
    """
    url = db.target_url(settings)
    with db.connect_autocommit(db.maintenance_url(url)) as admin:
        return _drop_leftovers(admin, url.database)


def _drop_leftovers(admin: Connection, target: str) -> CleanupResult:
    dropped, left = [], []
    for staging in staging_databases(admin, target):
        if staging.in_use or not _lock_staging(admin, staging.name):
            left.append(f"{staging.name} (a restore running now is using it)")
            continue
        try:
            admin.execute(sa.text(f"DROP DATABASE IF EXISTS {db.quote_ident(admin, staging.name)}"))
            dropped.append(staging.name)
        except DBAPIError as err:
            left.append(f"{staging.name} ({db.driver_message(err)})")
        finally:
            _unlock_staging(admin, staging.name)
    return CleanupResult(target, tuple(dropped), tuple(left))


# --- clone -------------------------------------------------------------------------------------------


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


def clone(settings: Settings, into: str) -> CloneResult:
    """Copy the target database on its server with ``CREATE DATABASE … TEMPLATE`` (no dump, no restore).

    On PostgreSQL 15 and later a large source is copied file by file (``STRATEGY FILE_COPY``), a
    small one through the WAL (``WAL_LOG``): see :data:`FILE_COPY_FROM_BYTES`. PostgreSQL refuses
    while anyone else is connected to the source; that is reported as a refusal.
    """
    db.check_database_name(into)
    url = db.target_url(settings)
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


# --- listing and pruning -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupInfo:
    """One backup in the backups folder, as `opslib backups` lists it."""

    path: Path
    database: str
    started_at: str
    revisions: tuple[str, ...]
    size_bytes: int
    label: str | None
    verified: bool | None
    verified_at: str | None
    restore_tested: bool

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {**self.__dict__, "path": str(self.path), "revisions": list(self.revisions)}


def list_backups(settings: Settings, folder: Path | None = None) -> list[BackupInfo]:
    """The backups in the folder (those with a manifest), newest first."""
    folder = Path(folder or settings.backups_dir)
    found = []
    for dump in folder.glob("*.dump") if folder.is_dir() else ():
        try:
            manifest = read_manifest(dump)
        except OpsError:
            continue
        verified = verified_at = None
        tested = False
        if verification_path(dump).is_file():
            try:
                outcome = json.loads(verification_path(dump).read_text())
                verified, verified_at, tested = (
                    bool(outcome.get("ok")),
                    outcome.get("verified_at"),
                    bool(outcome.get("restore_test")),
                )
            except ValueError:
                pass
        found.append(
            BackupInfo(
                path=dump,
                database=manifest["database"]["name"],
                started_at=manifest["started_at"],
                revisions=tuple(manifest["revisions"]),
                size_bytes=manifest["size_bytes"],
                label=manifest.get("label"),
                verified=verified,
                verified_at=verified_at,
                restore_tested=tested,
            )
        )
    return sorted(found, key=lambda b: (b.started_at, b.path.name), reverse=True)


def prune_backups(settings: Settings, keep: int, folder: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` backups, never the newest verified one; returns what was deleted."""
    if not isinstance(keep, int) or keep < 1:
        raise InvalidInput(f"--keep must be a whole number of at least 1, not {keep!r}")
    backups = list_backups(settings, folder)
    newest_verified = next((b for b in backups if b.verified), None)
    deleted = []
    for info in backups[keep:]:
        if info is newest_verified:
            continue
        for path in (info.path, manifest_path(info.path), verification_path(info.path)):
            path.unlink(missing_ok=True)
        deleted.append(info.path)
    return deleted
