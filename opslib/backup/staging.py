"""The staging databases of restores over the target, and the clean-up of those killed restores left.

A restore over the target restores into ``<target>_restoring_<hex>`` first. Each restore holds an
advisory lock named after its staging database, so a restore over the target (or ``opslib restore
--cleanup``) drops only the staging databases no running restore holds.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from opslib import db
from opslib.config import Settings
from opslib.errors import PreconditionFailed


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


def leftover_restores(where: Settings | db.TargetDatabase) -> list[StagingDatabase]:
    """The staging databases of restores over the target that no running restore holds (killed ones' debris)."""
    target = db.TargetDatabase.of(where)  # resolved once: the URL every step of it uses
    url = target.url
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


def cleanup_restores(where: Settings | db.TargetDatabase) -> CleanupResult:
    """Drop the staging databases that killed restores over the target left behind.

    One that a restore running now is using is never dropped: each restore holds an advisory lock
    named after its staging database from before creating it until it is renamed or dropped, a
    leftover is dropped only under that lock, and only when no session is connected to it (no
    ``FORCE``: someone looking into it is not cut off).
    """
    target = db.TargetDatabase.of(where)  # resolved once: the URL every step of it uses
    url = target.url
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
