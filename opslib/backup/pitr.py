"""Point-in-time recovery with pgBackRest: restore into a staging data folder, replay WAL to a restore
point (or a time, or an LSN), start it on a port of its own, and check it against what the gate recorded;
then put it in place of the server's data folder, or copy its database into a new one on the server.

Nothing touches the original until it is put in place: a recovery that fails or is killed before leaves
the server running as it was. A staging folder is held by its recovery (an ``flock``); the next recovery
stops and removes the ones nobody holds.

The staging server runs with an empty ``archive_command``: it archives nothing (its new timeline must
not reach the repository unless it replaces the server), and keeps its WAL; once in place, the server's
own ``archive_command`` archives that WAL, so the new timeline reaches the repository then.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import URL

from opslib import db, embedded, pgbackrest, pgtools, schema
from opslib.backup.manifest import count_differences, row_counts, table_checksums
from opslib.checkreport import FAIL, PASS, SKIP, CheckReport
from opslib.errors import BackupFailed, InvalidInput, NotRecovered, OpsError, PreconditionFailed
from opslib.record import RestorePoint

START_TIMEOUT_S = 3600  # replaying WAL to the target can take long on a busy server


@dataclass(frozen=True)
class RecoveryTarget:
    """Where a recovery stops: a restore point's name, a time, or an LSN; and the backup it starts from
    (None: pgBackRest chooses)."""

    kind: str  # name | time | lsn | immediate
    value: str = ""
    backup_label: str | None = None
    timeline: int | None = None  # the point's: a later recovery in place may have left it for a new one

    def options(self) -> list[str]:
        """pgBackRest restore's options for this target."""
        found = [f"--type={self.kind}"] + ([f"--target={self.value}"] if self.kind != "immediate" else [])
        found.append("--target-action=promote")
        if self.timeline is not None:
            found.append(f"--target-timeline={self.timeline}")
        return found + ([f"--set={self.backup_label}"] if self.backup_label else [])

    def describe(self) -> str:
        """The target in words."""
        if self.kind == "immediate":
            return "the end of the backup (immediate)"
        return {"name": "restore point", "time": "time", "lsn": "LSN"}[self.kind] + f" {self.value}"


def target_of(point: RestorePoint | None, target_time: str, target_lsn: str) -> RecoveryTarget:
    """The recovery target from exactly one of a restore point, a time and an LSN."""
    given = [x for x in (point, target_time, target_lsn) if x]
    if len(given) != 1:
        raise InvalidInput("recovery to a point in time needs exactly one of restore_point, target_time, target_lsn")
    if point is not None:
        return RecoveryTarget("name", point.name, point.backup_label or None, timeline_of(point))
    if target_time:
        return RecoveryTarget("time", target_time)
    return RecoveryTarget("lsn", target_lsn)


def timeline_of(point: RestorePoint) -> int | None:
    """The timeline a restore point was made on: its WAL segment's name begins with it."""
    try:
        return int(point.wal_file[:8], 16)
    except (TypeError, ValueError):
        return None


@dataclass
class StagingServer:
    """A recovered copy of the server: its data folder, the port and socket it listens on, who runs it."""

    root: Path
    pgdata: Path
    socket_dir: Path
    port: int
    run_as: str | None
    bin_dir: Path
    lock: Path
    lock_fd: int
    seconds_restore: float = 0.0
    seconds_replay: float = 0.0

    def url(self, base: URL) -> URL:
        """``base`` (the target's URL: its user, password and database) pointed at this server's socket."""
        query = {k: v for k, v in base.query.items() if k not in ("host", "port")}
        return base.set(host=None, port=self.port, query={**query, "host": str(self.socket_dir)})

    def stop(self, mode: str = "immediate") -> None:
        """Stop the staging server if it runs (immediate: nothing of it is kept; fast: it is put in place)."""
        if (self.pgdata / "postmaster.pid").exists():
            _pg_ctl(self.bin_dir, self.pgdata, self.run_as, "-m", mode, "-w", "stop", check=mode != "immediate")

    def remove(self) -> None:
        """Stop it, remove its folders, and let go of its lock."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)
        self.lock.unlink(missing_ok=True)
        os.close(self.lock_fd)


def staging_root(state_dir: Path) -> Path:
    """Where recoveries keep their staging folders."""
    return (Path(state_dir) / "recovery").resolve()


def cleanup_staging(state_dir: Path) -> list[Path]:
    """Stop and remove the staging folders no running recovery holds (left by a killed one), with their socket
    folders; their paths. Each recovery holds ``<run id>.lock`` beside its folder from before it makes it."""
    removed = []
    root = staging_root(state_dir)
    for lock in sorted(root.glob("*.lock")) if root.is_dir() else []:
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # a recovery is running there
        folder = lock.with_suffix("")
        pgdata = folder / "pgdata"
        if (pgdata / "postmaster.pid").exists():
            _pg_ctl(_bin_dir_of(pgdata), pgdata, embedded.data_owner(pgdata), "-m", "immediate", "-w", "stop", check=False)
        _remove_socket_folder(folder)
        shutil.rmtree(folder, ignore_errors=True)
        lock.unlink(missing_ok=True)
        os.close(fd)
        removed.append(folder)
    return removed


def _remove_socket_folder(folder: Path) -> None:
    try:
        named = Path((folder / "socket-folder").read_text().strip())
    except OSError:
        return
    if named.name.startswith("opslib-pitr-"):  # only ever one of ours
        shutil.rmtree(named, ignore_errors=True)


def recover(
    target: db.TargetDatabase, stanza: pgbackrest.Stanza, where: RecoveryTarget, run_id: str, major: int
) -> StagingServer:
    """Restore the stanza's backup into a staging folder, replay WAL to ``where``, and start it, promoted,
    on a port of its own. A failure removes the staging folder (:class:`NotRecovered`, exit 3); the server was not
    touched."""
    cleanup_staging(target.settings.state_dir)
    staging = _make_staging(target.settings.state_dir, run_id, stanza.run_as, major)
    try:
        started = time.monotonic()
        pgbackrest.run(stanza, "restore", f"--pg1-path={staging.pgdata}", *where.options(), error=NotRecovered)
        _forget_the_servers_socket(staging.pgdata)
        staging.seconds_restore = time.monotonic() - started
        started = time.monotonic()
        _start(staging, where)
        _wait_until_promoted(staging, target.url, where)
        staging.seconds_replay = time.monotonic() - started
    except NotRecovered as err:
        staging.remove()
        raise NotRecovered(f"{err.message}; the database was not touched") from None
    except BaseException:
        staging.remove()
        raise
    return staging


def _forget_the_servers_socket(pgdata: Path) -> None:
    """Remove the original server's socket lock files, copied with its data folder where the socket lives
    there (the embedded server's): the recovered server, put in place, would take them for a running one."""
    for leftover in pgdata.glob(".s.PGSQL.*"):
        leftover.unlink(missing_ok=True)


def _make_staging(state_dir: Path, run_id: str, run_as: str | None, major: int) -> StagingServer:
    """The staging folder of a recovery, its socket folder, and its lock (taken before the folder exists, so
    that :func:`cleanup_staging` never takes a folder being made for a leftover)."""
    bin_dir = _server_bin_dir(major)
    home = staging_root(state_dir)
    home.mkdir(parents=True, exist_ok=True)
    lock = home / f"{run_id}.lock"
    lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    root, socket_dir = home / run_id, None
    try:
        root.mkdir()
        pgdata = root / "pgdata"
        pgdata.mkdir(mode=0o700)
        # A short socket folder: a Unix socket's path has at most 107 bytes. Named in the staging folder, so
        # that the clean-up of a killed recovery finds it.
        socket_dir = Path(tempfile.mkdtemp(prefix="opslib-pitr-"))
        (root / "socket-folder").write_text(str(socket_dir))
        if run_as:
            owner = pwd.getpwnam(run_as)
            for path in (root, pgdata, socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        if socket_dir is not None:
            shutil.rmtree(socket_dir, ignore_errors=True)
        lock.unlink(missing_ok=True)
        os.close(lock_fd)
        raise
    return StagingServer(root, pgdata, socket_dir, _free_port(), run_as, bin_dir, lock, lock_fd)


def _free_port() -> int:
    """A port no one listens on. The staging server listens only on its own socket folder, where any port is
    free; a free TCP port is still chosen, so that its number is unique on the machine (in logs, in ps)."""
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    except OSError:  # no loopback (a network namespace without it): the private socket folder is enough
        return 5432


def _server_bin_dir(major: int) -> Path:
    """The folder of a PostgreSQL server of ``major`` (pg_ctl and postgres): the embedded wheel's, or one of
    this machine's installed servers."""
    for tool in pgtools.find_all("pg_ctl"):
        if tool.major == major and (Path(tool.path).parent / "postgres").exists():
            return Path(tool.path).parent
    raise PreconditionFailed(f"no PostgreSQL {major} server program (pg_ctl, postgres) on this machine to recover into")


def _bin_dir_of(pgdata: Path) -> Path:
    try:
        major = int((pgdata / "PG_VERSION").read_text().strip())
    except (OSError, ValueError):
        return embedded.bin_dir()
    return _server_bin_dir(major)


def _pg_ctl(bin_dir: Path, pgdata: Path, run_as: str | None, *args: str, check: bool = True) -> str:
    done = subprocess.run(
        [str(bin_dir / "pg_ctl"), "-D", str(pgdata), *args],
        capture_output=True,
        text=True,
        cwd="/",
        **pgtools.as_user(run_as),
    )
    if check and done.returncode != 0:
        raise BackupFailed(f"pg_ctl {args[-1]} failed for {pgdata}: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    return done.stdout


def _start(staging: StagingServer, where: RecoveryTarget) -> None:
    options = (
        f"-c port={staging.port} -c listen_addresses='' -c unix_socket_directories='{staging.socket_dir}' "
        "-c archive_command='' -c archive_library=''"
    )
    log = staging.root / "server.log"
    try:
        _pg_ctl(staging.bin_dir, staging.pgdata, staging.run_as, "-w", "-t", str(START_TIMEOUT_S), "-l", str(log), "-o", options, "start")
    except BackupFailed:
        raise _stopped(staging, where) from None


def _stopped(staging: StagingServer, where: RecoveryTarget) -> NotRecovered:
    """The one message of a recovered server that ended before the target (its log's last error says why)."""
    return NotRecovered(f"the recovered server stopped before reaching {where.describe()}: {_tail(staging.root / 'server.log')}")


def _tail(log: Path) -> str:
    try:
        lines = [line for line in log.read_text().splitlines() if "FATAL" in line or "ERROR" in line]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(no error in the log)"


# What a server says while it starts or replays: worth asking again. Anything else (no such database, a
# password refused) will not change by waiting.
_NOT_YET = ("starting up", "in recovery", "not yet accepting", "shutting down", "No such file", "Connection refused")


def _wait_until_promoted(staging: StagingServer, base: URL, where: RecoveryTarget) -> None:
    """Wait until the staging server has replayed to the target and left recovery (promoted)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    url = staging.url(base)
    while True:
        try:
            with db.connect(url) as conn:
                if not conn.execute(sa.text("SELECT pg_is_in_recovery()")).scalar():
                    return
        except OpsError as err:
            transient = any(words in err.message for words in _NOT_YET)
            if not transient:
                time.sleep(0.5)  # a server ending on a FATAL closes its sessions first: let it finish ending
            if not (staging.pgdata / "postmaster.pid").exists():
                raise _stopped(staging, where) from None
            if not transient:
                raise NotRecovered(f"the recovered server cannot be read: {err.message}") from None
        if time.monotonic() > deadline:
            raise NotRecovered(f"the recovered server did not reach {where.describe()} within {START_TIMEOUT_S} s")
        time.sleep(0.1)


@dataclass(frozen=True)
class Comparison:
    """A recovered database checked against a restore point's values: each fact, and what differs."""

    facts: list[tuple[str, str]]
    differences: list[str]


def compare(staging: StagingServer, base: URL, point: RestorePoint | None) -> Comparison:
    """The recovered database's revision, schema fingerprint and row counts, against the point's."""
    table = point.version_table if point and point.version_table else db.DEFAULT_VERSION_TABLE
    with db.connect(staging.url(base)) as conn:
        revisions = db.version_revisions(conn, table)
        shape = schema.fingerprint(conn, table)
        counts = row_counts(conn, logged_only=True)
        sums = table_checksums(conn, logged_only=True) if point is not None and point.checksums is not None else None
    app = {k: v for k, v in counts.items() if not k.startswith("opslib.")}
    facts = [
        ("revision", ", ".join(revisions) or "none"),
        ("schema fingerprint", shape[:16] + "…"),
        ("tables / rows", f"{len(app)} / {sum(app.values())}"),
    ]
    if point is None:
        return Comparison(facts + [("compared", "no: recovery to a time or an LSN has nothing recorded to compare")], [])
    differences = []
    if tuple(revisions) != tuple(point.revisions):
        differences.append(f"revision {', '.join(revisions) or 'none'}, at the gate {', '.join(point.revisions) or 'none'}")
    if point.fingerprint and shape != point.fingerprint:
        differences.append("the schema differs from the gate's (fingerprint)")
    if point.row_counts is not None and counts != point.row_counts:
        differences.append(f"row counts differ: {count_differences(point.row_counts, counts)}")
    if sums is not None and sums != point.checksums:
        changed = sorted(t for t in set(sums) | set(point.checksums) if sums.get(t) != point.checksums.get(t))
        differences.append(f"the rows of {', '.join(changed[:3])}{' …' if len(changed) > 3 else ''} differ (checksums)")
    compared = "revision, schema, every table's rows" + (" and their checksums" if sums is not None else "")
    facts.append(("compared with the gate", f"equal: {compared}" if not differences else "DIFFERENT"))
    return Comparison(facts, differences)


def verify_physical(
    target: db.TargetDatabase, stanza: pgbackrest.Stanza, point: RestorePoint | None, run_id: str, major: int
) -> CheckReport:
    """Check the stanza's repository (``pgbackrest verify``: every backup's files and the WAL archive), then
    recover to ``point`` (None: the end of the newest backup) in a scratch data folder, compare it with the
    point's values, and time it. The scratch folder is removed; the server is not touched."""
    report = CheckReport(f"verify-backup pgbackrest:{stanza.name}")
    started = time.monotonic()
    try:
        pgbackrest.verify(stanza)
    except InvalidInput:
        raise  # the configuration (OPSLIB_PGBACKREST, the policy): exit 2, as everywhere
    except OpsError as err:
        report.add("repository", FAIL, err.message)
        report.add("restore test", SKIP, "an earlier check failed")
        return report
    report.add("repository", PASS, f"pgbackrest verify: backups and WAL archive readable ({time.monotonic() - started:.1f} s)")
    where = target_of(point, "", "") if point else RecoveryTarget("immediate")
    started = time.monotonic()
    try:
        staging = recover(target, stanza, where, run_id, major)
    except OpsError as err:
        report.add("restore test", FAIL, err.message)
        return report
    try:
        compared = compare(staging, target.url, point)
    finally:
        staging.remove()
    seconds = time.monotonic() - started
    if compared.differences:
        report.add("restore test", FAIL, f"to {where.describe()}: {'; '.join(compared.differences)}")
    else:
        facts = ", ".join(f"{k} {v}" for k, v in compared.facts)
        report.add("restore test", PASS, f"to {where.describe()} in {seconds:.1f} s: {facts}")
    return report
