"""The pgBackRest gate before a change: a physical backup when the policy's ages ask for one, then a named
restore point ``opslib-<run id>`` right before the first change, its WAL segment switched and archived.

Its cost does not grow with the database, where a dump's does: the restore point, the WAL switch and the
archiving of one segment. A backup is taken only when there is none, or when the newest is older than the
policy says (a full one after ``full_max_age_h``, an incremental one after ``incremental_max_age_h``).

What the database held at the point (revision, schema fingerprint, every table's rows) is read in a
snapshot that is exactly the point: the tables are locked against writers (SHARE, a few milliseconds)
while the point is made and its snapshot exported; another session takes that snapshot over and reads it
after the writers are let go. A recovery to the point is checked against these values.
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import timezone
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from opslib import db, embedded, pgbackrest, schema
from opslib.backup.manifest import row_counts, table_checksums
from opslib.config import Settings
from opslib.errors import BackupMethodUnavailable, BackupNotTaken, ConfigError, InvalidInput
from opslib.policy import BackupPolicy, load_backup_policy
from opslib.record import RestorePoint

POINT_PREFIX = "opslib-"
# Every table the gate locks (a partitioned table's lock covers its partitions): not the system's.
_TABLES = (
    "c.relkind IN ('r', 'p') AND NOT c.relispartition AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
    "AND n.nspname NOT LIKE 'pg\\_%'"
)


def point_name(run_id: str) -> str:
    """The restore point a run makes at its gate."""
    return f"{POINT_PREFIX}{run_id}"


def backup_policy(settings: Settings) -> BackupPolicy:
    """The project's ``[backup]`` policy."""
    return load_backup_policy(settings.alembic_ini)


def stanza_for(settings: Settings, policy: BackupPolicy) -> pgbackrest.Stanza:
    """The pgBackRest stanza of the target: the team's (``[backup] stanza`` and ``config``), else the
    embedded server's; a server opslib does not run, without a stanza named, is refused."""
    if policy.config or policy.stanza:
        if not (policy.config and policy.stanza):
            raise ConfigError(
                "backup method pgbackrest: name both [backup] stanza and config (the team's pgbackrest.conf) in the policy"
            )
        config = Path(policy.config)
        if not config.is_absolute():
            config = Path(settings.alembic_ini).resolve().parent / config
        if not config.is_file():
            raise ConfigError(f"backup method pgbackrest: the policy's [backup] config {config} is not a file")
        # Run as root, pgBackRest runs as the owner of the team's configuration (postgres, as Debian installs it).
        return pgbackrest.Stanza(policy.stanza, config, embedded.data_owner(config))
    if embedded.is_target(settings):
        return embedded.stanza(settings)
    raise BackupMethodUnavailable(
        "backup method pgbackrest: the target is not the embedded server; name its stanza in the policy: "
        "[backup] stanza = \"main\", config = \"/etc/pgbackrest/pgbackrest.conf\""
    )


def require_archiving(conn: Connection, stanza: pgbackrest.Stanza, settings: Settings) -> None:
    """Refuse (exit 3) a server that cannot reach a restore point: WAL not archived to pgBackRest, or a role
    that may not make a restore point or switch WAL. Each refusal names the one setting to change."""
    setting = dict(
        conn.execute(
            sa.text(
                "SELECT name, setting FROM pg_settings WHERE name IN ('archive_mode', 'archive_command', 'wal_level')"
            )
        ).all()
    )
    how = (
        "opslib db start --archive (it restarts the embedded server)"
        if embedded.is_target(settings)
        else f"archive_mode = on and archive_command = 'pgbackrest --stanza={stanza.name} archive-push %p' "
        "in postgresql.conf, then restart"
    )
    if setting.get("wal_level") == "minimal":
        raise BackupMethodUnavailable(f"the server keeps too little WAL for a recovery (wal_level = minimal): {how}")
    if setting.get("archive_mode") not in ("on", "always"):
        raise BackupMethodUnavailable(f"the server does not archive its WAL (archive_mode = off): {how}")
    if "pgbackrest" not in (setting.get("archive_command") or ""):
        raise BackupMethodUnavailable(f"the server's archive_command does not push WAL to pgBackRest: {how}")
    _require_privileges(conn)


def _require_privileges(conn: Connection) -> None:
    """The role may make a restore point and switch WAL, and lock (SHARE) and read every table at the point."""
    role, database, *allowed = conn.execute(
        sa.text(
            "SELECT current_user, current_database(), has_function_privilege('pg_create_restore_point(text)', 'EXECUTE'), "
            "has_function_privilege('pg_switch_wal()', 'EXECUTE')"
        )
    ).one()
    if not all(allowed):
        raise BackupMethodUnavailable(
            f"role {role} may not make a restore point: GRANT EXECUTE ON FUNCTION pg_create_restore_point(text), "
            f"pg_switch_wal() TO {role} (in database {database})"
        )
    # LOCK ... IN SHARE MODE needs UPDATE, DELETE, TRUNCATE or MAINTAIN; reading the rows there needs SELECT.
    denied = conn.execute(
        sa.text(
            f"SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            f"WHERE {_TABLES} AND NOT (has_table_privilege(c.oid, 'SELECT') AND (has_table_privilege(c.oid, 'UPDATE') "
            "OR has_table_privilege(c.oid, 'DELETE') OR has_table_privilege(c.oid, 'TRUNCATE'))) ORDER BY 1"
        )
    ).scalars().all()
    conn.rollback()
    if denied:
        shown = ", ".join(denied[:3]) + (f" and {len(denied) - 3} more" if len(denied) > 3 else "")
        raise BackupMethodUnavailable(
            f"role {role} may not lock and read {shown} at the restore point: GRANT SELECT, UPDATE ON {denied[0]} "
            f"TO {role} (in database {database}), for each"
        )


def ensure_backup(stanza: pgbackrest.Stanza, policy: BackupPolicy) -> tuple[pgbackrest.PhysicalBackup, str, float]:
    """The backup a recovery to a point made now starts from: the newest one, or a new full one (none yet,
    or the newest full older than ``full_max_age_h``), or a new incremental one (the newest older than
    ``incremental_max_age_h``). Returns it, what was taken (``full``, ``incr`` or ``none``) and its seconds."""
    found = pgbackrest.info(stanza, error=BackupNotTaken)
    now = time.time()
    full = found.newest_full
    kind = "none"
    if full is None or now - full.stopped_at > policy.full_max_age_h * 3600:
        kind = "full"
    elif found.newest is not None and now - found.newest.stopped_at > policy.incremental_max_age_h * 3600:
        kind = "incr"
    started = time.monotonic()
    if kind != "none":
        pgbackrest.run(stanza, "backup", f"--type={kind}", error=BackupNotTaken)
        found = pgbackrest.info(stanza, error=BackupNotTaken)
    seconds = time.monotonic() - started
    assert found.newest is not None  # a backup was just taken, or one was there
    return found.newest, kind, seconds


def gate(
    target: db.TargetDatabase,
    run_id: str,
    version_table: tuple[str | None, str],
    policy: BackupPolicy | None = None,
) -> RestorePoint:
    """Take the pgBackRest gate before a change: a backup if the policy's ages ask for one, then the restore
    point ``opslib-<run id>``, its segment switched and archived, and what the database held there.

    Refused (:class:`BackupMethodUnavailable`, exit 3) where it cannot work; a point that cannot be made
    or archived is :class:`BackupNotTaken` (exit 3). Either way the database was not changed.
    """
    settings = target.settings
    policy = policy or backup_policy(settings)
    stanza = stanza_for(settings, policy)
    url = target.url
    with db.connect(url) as conn:
        require_archiving(conn, stanza, settings)
    newest, taken, backup_s = ensure_backup(stanza, policy)
    started = time.monotonic()
    with db.connect(url) as writer_gate, db.connect(url) as reader:
        lsn, created_at = _point_in_one_snapshot(writer_gate, reader, point_name(run_id), settings.lock_timeout_s)
        wal_file = _switch_and_wait(writer_gate, lsn, policy.archive_timeout_s)
        gate_s = time.monotonic() - started
        point = RestorePoint(
            name=point_name(run_id),
            lsn=lsn,
            created_at=created_at,
            wal_file=wal_file,
            stanza=stanza.name,
            backup_label=newest.label,
            backup_taken=taken,
            version_table=version_table,
            gate_s=round(gate_s, 3),
            backup_s=round(backup_s, 3),
        )
        return _read_at_point(reader, point, policy.row_counts, policy.table_checksums)


def _point_in_one_snapshot(writers: Connection, reader: Connection, name: str, lock_timeout_s: float) -> tuple[str, str]:
    """Make the restore point while writers are held off, and hand its exact snapshot to ``reader``.

    ``writers`` locks every table (SHARE: reads go on), makes the point, and exports its snapshot, which
    ``reader`` takes over before the locks are let go; the first statement after LOCK takes the snapshot,
    and no writer can commit between it and the point.
    """
    # Read before the locked transaction: in it, the first query would take the snapshot before the locks. A table
    # made in between is not locked; its writes could then differ at the point, which a recovery's comparison would
    # show (a refusal, never a silent difference); deploys make tables under the run lock, after the gate.
    tables = writers.execute(
        sa.text(
            f"SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            f"WHERE {_TABLES} ORDER BY 1"
        )
    ).scalars().all()
    writers.rollback()
    snap = writers.execution_options(isolation_level="REPEATABLE READ")
    try:
        with snap.begin():
            snap.execute(sa.text(f"SET LOCAL lock_timeout = '{int(lock_timeout_s * 1000)}ms'"))
            if tables:
                snap.execute(sa.text(f"LOCK TABLE {', '.join(tables)} IN SHARE MODE"))
            row = snap.execute(
                sa.text("SELECT pg_create_restore_point(:n)::text, now(), pg_export_snapshot()"), {"n": name}
            ).one()
            taking = reader.execution_options(isolation_level="REPEATABLE READ")
            taking.begin()
            taking.execute(sa.text(f"SET TRANSACTION SNAPSHOT '{row[2]}'"))
            taking.execute(sa.text("SET TRANSACTION READ ONLY"))
    except DBAPIError as err:
        if db.is_lock_timeout(err):
            raise BackupNotTaken(
                f"the restore point was not made: writers held a table for more than {lock_timeout_s:g} s "
                "(OPSLIB_LOCK_TIMEOUT_S); nothing was changed"
            ) from None
        raise BackupNotTaken(f"the restore point was not made: {db.driver_message(err)}") from None
    return row[0], row[1].astimezone(timezone.utc).isoformat()


def _switch_and_wait(conn: Connection, lsn: str, timeout_s: float) -> str:
    """Switch to a new WAL segment and wait until the one holding ``lsn`` is archived; its name."""
    wal_file = conn.execute(sa.text("SELECT pg_walfile_name(CAST(:l AS pg_lsn))"), {"l": lsn}).scalar()
    conn.execute(sa.text("SELECT pg_switch_wal()"))
    conn.commit()
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        archived, failed, failed_at = conn.execute(
            sa.text("SELECT last_archived_wal, last_failed_wal, last_failed_time FROM pg_stat_archiver")
        ).one()
        conn.rollback()
        if archived and archived[:24] >= wal_file:
            return wal_file
        if time.monotonic() > deadline:
            why = f"; the archiver last failed on {failed} at {failed_at}" if failed else ""
            raise BackupNotTaken(
                f"WAL segment {wal_file} was not archived within {timeout_s:g} s{why}: see the server's log and "
                "pgBackRest's (archive_command); nothing was changed"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _read_at_point(reader: Connection, point: RestorePoint, counts: bool, checksums: bool) -> RestorePoint:
    """What the database held at the point, read in its snapshot (held by ``reader`` since the point)."""
    started = time.monotonic()
    try:
        revisions = db.version_revisions(reader, point.version_table or db.DEFAULT_VERSION_TABLE)
        shape = schema.fingerprint(reader, point.version_table or db.DEFAULT_VERSION_TABLE)
        rows = row_counts(reader, logged_only=True) if counts else None
        sums = table_checksums(reader, logged_only=True) if checksums else None
    except DBAPIError as err:
        raise BackupNotTaken(f"what the database held at {point.name} could not be read: {db.driver_message(err)}") from None
    finally:
        reader.rollback()
    return replace(
        point,
        revisions=tuple(revisions),
        fingerprint=shape,
        row_counts=rows,
        checksums=sums,
        counts_s=round(time.monotonic() - started, 3),
    )


def backup_path(point: RestorePoint) -> str:
    """What a record names as the backup of a pgBackRest gate: ``pgbackrest:<stanza>/<backup label>``."""
    return f"pgbackrest:{point.stanza}/{point.backup_label}"


def configured(settings: Settings) -> bool:
    """Whether this project keeps pgBackRest backups: the policy says so, or the embedded server archives."""
    policy = backup_policy(settings)
    if policy.method == "pgbackrest" or policy.config:
        return True
    return embedded.is_target(settings) and embedded.stanza(settings).config.is_file()


def expire(settings: Settings, keep: int | None = None) -> pgbackrest.StanzaInfo:
    """Apply the retention with pgBackRest's expire: keep the newest ``keep`` full backups (None: the policy's
    ``retention_full``) and what depends on them, and the WAL they need; the stanza's info after."""
    policy = backup_policy(settings)
    keep = policy.retention_full if keep is None else keep
    if keep < 1:
        raise InvalidInput("prune-backups --pgbackrest --keep must be 1 or more: the newest full backup is always kept")
    stanza = stanza_for(settings, policy)
    pgbackrest.run(stanza, "expire", f"--repo1-retention-full={keep}")
    return pgbackrest.info(stanza)
