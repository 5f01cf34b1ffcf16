"""Restoring a verified backup into a new database, or over the target through a staging database.

Over the target, a failure at any point, or a kill, leaves the target as it was; a staging database
that a killed restore left is dropped by the next one (:mod:`opslib.backup.staging`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError

from opslib import db
from opslib.backup.manifest import (
    STAMP,
    _backup_file,
    count_differences,
    _manifest_version_table,
    _now,
    read_manifest,
    row_counts,
)
from opslib.backup.programs import _pg_restore
from opslib.backup.staging import _drop_leftovers, _lock_staging, _staging_name, _unlock_staging
from opslib.backup.verify import verify_backup
from opslib.config import Settings
from opslib.errors import BackupFailed, PreconditionFailed


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
    where: Settings | db.TargetDatabase,
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
    target = db.TargetDatabase.of(where)  # resolved once: the URL every step of it uses
    path = _backup_file(file)
    # The archive is checked first (not recorded: a restore-tested verification stays on record).
    verify_backup(target, path, record=False).raise_for_failure()
    manifest = read_manifest(path)
    url = target.url
    name = url.database
    if into is None:
        into = _unnamed_into(manifest, name, confirm)
    db.check_database_name(into)
    stamp = _now().strftime(STAMP).lower()
    with db.connect_autocommit(db.maintenance_url(url)) as admin:
        _, major = db.server_version(admin)
        over = _is_over_target(admin, into, name)
        removed: tuple[str, ...] = ()
        if over:
            removed = _make_way(
                admin, manifest, path, name, confirm, terminate_connections, allow_other_database
            )
        staging = _staging_name(into) if over else into
        _create_staging(admin, staging, over)
        try:
            counts, revisions, matches = _restore_and_compare(
                url.set(database=staging), major, path, manifest, _untouched(over, name, into)
            )
            if over:
                _carry_over_properties(admin, name, staging)
            kept_as = _swap_in(url, admin, staging, name, stamp, terminate_connections) if over else None
        except BaseException:
            admin.execute(sa.text(f"DROP DATABASE IF EXISTS {db.quote_ident(admin, staging)} WITH (FORCE)"))
            raise
        finally:
            if over:
                _unlock_staging(admin, staging)
    return RestoreResult(path, into, revisions, counts, matches, kept_as, removed)


def _unnamed_into(manifest: dict, target: str, confirm: str | None) -> str:
    """Where a restore given no ``into`` goes: over the target when confirmed, else a new, stamped name."""
    return (
        target
        if confirm is not None
        else f"{manifest['database']['name']}_restored_{_now().strftime(STAMP).lower()}"[:63]
    )


def _is_over_target(admin: Connection, into: str, target: str) -> bool:
    """True when the restore replaces the target; any other database already there is a refusal."""
    exists = db.database_exists(admin, into)
    over = exists and into == target
    if exists and not over:
        raise PreconditionFailed(
            f"database {into!r} already exists: restore into a new name with --into, "
            f"or over the target database {target!r} with --confirm {target}"
        )
    return over


def _make_way(
    admin: Connection,
    manifest: dict,
    path: Path,
    target: str,
    confirm: str | None,
    terminate: bool,
    allow_other: bool,
) -> tuple[str, ...]:
    """Check that the target may be replaced; drop what killed restores over it left, and name those."""
    _check_confirmed(target, confirm)
    _check_same_database(manifest, path, target, allow_other)
    _check_sessions(admin, target, terminate)
    try:
        return _drop_leftovers(admin, target).dropped
    except DBAPIError:
        return ()  # the clean-up is a courtesy: it never stops a restore (`opslib check` names leftovers)


def _create_staging(admin: Connection, staging: str, over: bool) -> None:
    """Create the database a restore goes into; over the target, under a lock that the caller lets go."""
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


def _restore_and_compare(
    staging_url: URL, major: int, path: Path, manifest: dict, untouched: str
) -> tuple[dict[str, int], tuple[str, ...], bool]:
    """Restore ``path`` into the empty database of ``staging_url`` and compare it with the manifest.

    Returns the row counts, the revisions and whether they match; a failed restore or a mismatch is
    :class:`BackupFailed`, its message ending with ``untouched`` (what was left as it was).
    """
    failure = _pg_restore(staging_url, major, path, [])
    if failure:
        raise BackupFailed(f"restore of {path.name} failed: {failure}; " + untouched)
    with db.connect(staging_url) as conn:
        counts = row_counts(conn)
        revisions = db.version_revisions(conn, _manifest_version_table(manifest))
    matches = not count_differences(manifest["row_counts"], counts) and sorted(revisions) == sorted(
        manifest["revisions"]
    )
    if not matches:
        raise BackupFailed(f"the restored data does not match the manifest of {path.name}; " + untouched)
    return counts, revisions, matches


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
