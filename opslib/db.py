"""Connections to the target database: URL parsing and redaction, engines, and the run lock.

Every URL shown to a person goes through :func:`redact_url`; every driver error that reaches a
message goes through :func:`scrub`, so a password never lands in an output, a record or a log.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import ArgumentError, DBAPIError

from opslib.config import Settings
from opslib.errors import ConfigError, DatabaseUnreachable, InvalidInput, LockHeld
from opslib.redact import redact_url, redact_urls_in, remember_secrets, scrub  # noqa: F401 - part of this module's API
from opslib.signals import signals_deferred

# One advisory-lock key for every opslib run on a database (Sqitch's lock_destination idea):
# a run that changes the database holds it, a second run waits up to lock_timeout_s, then exits 4.
LOCK_KEY = int.from_bytes(hashlib.sha256(b"opslib migration lock").digest()[:8], "big", signed=True)

# What a target URL may name. opslib's own connections always use psycopg2; a URL naming another
# driver (an async env.py's asyncpg, psycopg 3) keeps it for the project's env.py (see env_driver).
_SCHEMES = {"postgresql", "postgres", "postgresql+psycopg2", "postgresql+asyncpg", "postgresql+psycopg"}
CONNECT_TIMEOUT_S = 5


def parse_url(raw: str, *, source: str = "DATABASE_URL") -> URL:
    """Parse a PostgreSQL URL and name the psycopg2 driver explicitly, for opslib's own connections.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3; opslib names its driver itself.
    Errors never repeat the URL, since it may hold a password.
    """
    remember_secrets(raw)  # a fleet's or a runbook's own target: its password is kept out of every record
    try:
        url = sa.make_url(raw.strip())
    except (ArgumentError, ValueError):
        raise ConfigError(
            f"{source} is not a valid URL: expected postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
        ) from None
    if url.drivername not in _SCHEMES:
        raise ConfigError(
            f"{source} must be a postgresql:// URL (or postgresql+psycopg2, +psycopg, +asyncpg), "
            f"not {url.drivername}://; opslib supports PostgreSQL only"
        )
    if not url.database:
        raise ConfigError(f"{source} names no database: add /DATABASE to the URL")
    return url.set(drivername="postgresql+psycopg2")


def env_driver(raw: str | None) -> str | None:
    """The driver a target URL names for the project's env.py (``postgresql+asyncpg``,
    ``postgresql+psycopg``), or None when it names psycopg2 or none."""
    scheme = (raw or "").strip().split("://", 1)[0]
    return scheme if scheme in ("postgresql+asyncpg", "postgresql+psycopg") else None


def target_url(settings: Settings) -> URL:
    """The URL of the database opslib operates on (the rule of :func:`opslib.config.target_url_text`):
    DATABASE_URL, else the project's alembic.ini ``sqlalchemy.url``, else the embedded server's."""
    if settings.database_url:
        return parse_url(settings.database_url, source=settings.url_source or "DATABASE_URL")
    from opslib import embedded  # late import: only runs that use it pay for it

    return parse_url(embedded.ensure_running(settings), source="the embedded server's URL")


class TargetDatabase:
    """The database one command or run operates on, its URL resolved once (the embedded server started at
    most once). :class:`opslib.migrate.Target` adds the Alembic project's facts; the verbs that need only
    the database (backups, clones) take this."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._url: URL | None = None

    @classmethod
    def of(cls, where: "Settings | TargetDatabase") -> "TargetDatabase":
        """``where`` itself when it is a target already, else the target its settings name."""
        if isinstance(where, cls):
            return where
        made = cls(where.settings if isinstance(where, TargetDatabase) else where)
        made._url = where._url if isinstance(where, TargetDatabase) else None
        return made

    @property
    def url(self) -> URL:
        """The database's URL (never shown as it is: see :attr:`database`)."""
        if self._url is None:
            self._url = target_url(self.settings)
        return self._url

    @property
    def database(self) -> str:
        """The URL as it may be shown: redacted."""
        return redact_url(self.url)


def make_engine(url: URL) -> Engine:
    """An engine without pooling (each run opens what it needs) that fails fast when unreachable."""
    return sa.create_engine(
        url,
        poolclass=sa.pool.NullPool,
        # A run sets PGAPPNAME to its own name, so that its sessions can be told apart (and ended if it dies).
        connect_args={"connect_timeout": CONNECT_TIMEOUT_S, "application_name": os.environ.get("PGAPPNAME") or "opslib"},
    )


def driver_message(err: BaseException, url: URL | None = None) -> str:
    """The first line of the driver's own message, without SQLAlchemy's SQL echo or links."""
    orig = getattr(err, "orig", None) or err
    lines = [line.strip() for line in str(orig).strip().splitlines() if line.strip()]
    return scrub(lines[0] if lines else type(orig).__name__, url)


# SQLSTATEs that say the role or the server cannot do what opslib asked: configuration, not a failure.
_INSUFFICIENT_PRIVILEGE, _READ_ONLY = "42501", "25006"


def config_error_of(err: BaseException) -> ConfigError | None:
    """A driver error that is the target's configuration (a role lacking a privilege, a read-only role
    or server), as the :class:`ConfigError` (exit 2) that names the privilege and the statement that
    needed it; None for any other error."""
    orig = getattr(err, "orig", None)
    code = getattr(orig, "pgcode", None)
    if not isinstance(err, DBAPIError) or code not in (_INSUFFICIENT_PRIVILEGE, _READ_ONLY):
        return None
    said = driver_message(err)
    statement = " ".join(str(getattr(err, "statement", "") or "").split(";")[0].split())
    needed = f" by {statement[:117] + '...' if len(statement) > 120 else statement}" if statement else ""
    if code == _READ_ONLY:
        return ConfigError(
            f"the target only takes read-only transactions ({said}), needed{needed}: the role has "
            "default_transaction_read_only on, or the server is a standby; use a role and server that can write"
        )
    return ConfigError(
        f"the role lacks a privilege ({said}), needed{needed}: grant it (GRANT CREATE ON DATABASE, "
        "or on the schema), or use a role that has it"
    )


@contextmanager
def connect(url: URL) -> Iterator[Connection]:
    """An open connection to ``url``; an unreachable server becomes :class:`DatabaseUnreachable`."""
    engine = make_engine(url)
    try:
        try:
            conn = engine.connect()
        except DBAPIError as err:
            raise DatabaseUnreachable(
                f"cannot connect to {redact_url(url)}: {driver_message(err, url)}; "
                "check DATABASE_URL and that the server is running"
            ) from None
        try:
            yield conn
        finally:
            with signals_deferred():  # closing is never cut half-way (the signal is raised after it)
                conn.close()
    finally:
        engine.dispose()


def lock_holder(conn: Connection) -> str:
    """Who holds the opslib lock on this database, as far as pg_stat_activity says."""
    row = conn.execute(
        sa.text(
            "SELECT a.pid, a.application_name, a.client_addr, a.backend_start "
            "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted "
            "AND l.classid = (:key >> 32)::int::oid AND l.objid = (:key & 4294967295)::oid "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ),
        {"key": LOCK_KEY},
    ).first()
    if row is None:
        return "another session"
    return f"backend pid {row.pid} ({row.application_name or 'no application name'}, connected since {row.backend_start:%Y-%m-%d %H:%M:%S %Z})"


# Databases whose opslib lock this process already holds (a runbook holds it for its whole run):
# the verbs it calls then work under that lock instead of waiting for it.
_HELD: set[str] = set()
# The server sessions (backend pids) through which this process holds the opslib lock: another session
# that sees one of them holding it is on the same database (see same_database).
_HELD_PIDS: set[int] = set()


def _lock_scope(conn: Connection) -> str:
    return redact_url(conn.engine.url)


def _try_lock(conn: Connection, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        got, pid = conn.execute(
            sa.text("SELECT pg_try_advisory_lock(:key), pg_backend_pid()"), {"key": LOCK_KEY}
        ).one()
        if got:
            conn.commit()
            _HELD_PIDS.add(int(pid))
            return
        if time.monotonic() >= deadline:
            holder = lock_holder(conn)
            conn.rollback()
            waited = f"; waited {timeout_s:g} s" if timeout_s else ""
            raise LockHeld(
                f"another opslib run holds the lock on database {conn.engine.url.database!r} ({holder}){waited}. "
                "Retry when it has finished"
            )
        conn.rollback()
        time.sleep(0.2)


def _unlock(conn: Connection) -> None:
    try:
        if conn.in_transaction():
            conn.rollback()
        pid = conn.execute(sa.text("SELECT pg_backend_pid() WHERE pg_advisory_unlock(:key)"), {"key": LOCK_KEY}).scalar()
        _HELD_PIDS.discard(pid)
        conn.commit()
    except DBAPIError:
        pass  # the connection is gone, and a session lock goes with it


@contextmanager
def advisory_lock(conn: Connection, timeout_s: float) -> Iterator[None]:
    """Hold the opslib session-level advisory lock on ``conn``'s database for the block.

    ``pg_try_advisory_lock`` in a loop rather than a blocking ``pg_advisory_lock``: a blocked
    lock request would queue behind, and deadlock with, ``CREATE INDEX CONCURRENTLY``. The
    transaction opened to take the lock is committed, so Alembic can still run one transaction
    per revision on this connection. When this process already holds the lock (a runbook's run
    lock), the block runs under it.
    """
    if _lock_scope(conn) in _HELD:
        yield
        return
    _try_lock(conn, timeout_s)
    try:
        yield
    finally:
        with signals_deferred():  # a signal now waits for the unlock: cut, it leaves the session unusable
            _unlock(conn)


class RunLock:
    """The opslib lock held for a whole runbook run, on a connection of its own (see :func:`hold_run_lock`)."""

    def __init__(self, engine: Engine, conn: Connection, scope: str):
        self.engine, self.conn, self.scope = engine, conn, scope

    def release(self) -> None:
        """Give the lock up and close its connection (a database being renamed must have no sessions)."""
        if self.conn is None:
            return
        _HELD.discard(self.scope)
        _unlock(self.conn)
        self.conn.close()
        self.engine.dispose()
        self.conn = None


def hold_run_lock(url: URL, application_name: str) -> RunLock:
    """Take the opslib lock now, without waiting, for the rest of a run; a held lock is :class:`LockHeld` (exit 4)."""
    engine = sa.create_engine(
        url,
        poolclass=sa.pool.NullPool,
        connect_args={"connect_timeout": CONNECT_TIMEOUT_S, "application_name": application_name[:63]},
    )
    try:
        conn = engine.connect()
    except DBAPIError as err:
        engine.dispose()
        raise DatabaseUnreachable(
            f"cannot connect to {redact_url(url)}: {driver_message(err, url)}"
        ) from None
    try:
        _try_lock(conn, 0)
    except BaseException:
        conn.close()
        engine.dispose()
        raise
    scope = _lock_scope(conn)
    _HELD.add(scope)
    return RunLock(engine, conn, scope)


def is_lock_timeout(err: BaseException) -> bool:
    """True when a statement gave up waiting for a lock (SQLSTATE 55P03, lock_not_available)."""
    return getattr(getattr(err, "orig", None), "pgcode", None) == "55P03"


def blocking_sessions(conn: Connection, older_than_s: float = 5.0) -> list[dict]:
    """Other sessions of this database in a transaction for longer than ``older_than_s`` that hold table locks.

    These are what a migration's DDL would queue behind (and, without a lock timeout, make every
    query on the table queue behind it).
    """
    rows = conn.execute(
        sa.text(
            "SELECT a.pid, a.application_name, a.state, "
            "round(extract(epoch FROM now() - a.xact_start))::int AS seconds, "
            "string_agg(DISTINCT l.relation::regclass::text, ', ') AS tables "
            "FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid AND l.locktype = 'relation' "
            "WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() "
            "AND a.xact_start < now() - make_interval(secs => :age) "
            "GROUP BY a.pid, a.application_name, a.state, a.xact_start ORDER BY a.xact_start"
        ),
        {"age": older_than_s},
    ).mappings()
    found = [dict(r) for r in rows]
    if conn.in_transaction():
        conn.commit()
    return found


def server_version(conn: Connection) -> tuple[str, int]:
    """The server's version string and major version number."""
    version = conn.execute(sa.text("SHOW server_version")).scalar()
    num = int(conn.execute(sa.text("SHOW server_version_num")).scalar())
    if conn.in_transaction():
        conn.commit()
    return str(version), num // 10000


def maintenance_url(url: URL) -> URL:
    """A URL on the same server for CREATE/DROP/ALTER DATABASE: ``postgres``, or ``template1`` when that is the target."""
    return url.set(database="template1" if url.database == "postgres" else "postgres")


@contextmanager
def connect_autocommit(url: URL) -> Iterator[Connection]:
    """A connection outside transactions, as CREATE DATABASE and DROP DATABASE need."""
    with connect(url) as conn:
        yield conn.execution_options(isolation_level="AUTOCOMMIT")


_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,62}$")


def check_database_name(name: str) -> str:
    """A database name opslib will create: letters, digits, ``_`` and ``-``, at most 63 characters."""
    if not isinstance(name, str) or not _DB_NAME.match(name):
        raise InvalidInput(
            f"{name!r} is not a usable database name: start with a letter or _, then letters, digits, _ or -, "
            "at most 63 characters"
        )
    return name


def quote_ident(conn: Connection, name: str) -> str:
    """``name`` quoted as an SQL identifier for this connection's dialect."""
    return conn.dialect.identifier_preparer.quote_identifier(name)


def quote_qualified(conn: Connection, dotted: str) -> str:
    """``schema.table`` (or a bare name) with each part quoted as an identifier."""
    return ".".join(quote_ident(conn, part) for part in dotted.split("."))


def database_exists(conn: Connection, name: str) -> bool:
    """True when a database called ``name`` exists on the server."""
    return bool(conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).scalar())


def other_sessions(conn: Connection, name: str) -> list[int]:
    """Backend pids of other sessions connected to database ``name``."""
    rows = conn.execute(
        sa.text(
            "SELECT pid FROM pg_stat_activity WHERE datname = :n AND pid <> pg_backend_pid() ORDER BY pid"
        ),
        {"n": name},
    )
    return [r[0] for r in rows]


# Where a project keeps its revision: (schema or None for the search_path, table), Alembic's default.
DEFAULT_VERSION_TABLE: tuple[str | None, str] = (None, "alembic_version")


def version_revisions(
    conn: Connection, where: tuple[str | None, str] = DEFAULT_VERSION_TABLE
) -> tuple[str, ...]:
    """The revision(s) in the project's version table (``where``: schema, table, as its env.py
    configures them; without a schema it is found on the search_path, as Alembic does); () if none.

    Plain SQL rather than Alembic's MigrationContext, so reading a revision (for a backup's
    manifest, say) does not pay for importing Alembic.
    """
    schema, table = where
    name = f"{quote_ident(conn, schema)}.{quote_ident(conn, table)}" if schema else quote_ident(conn, table)
    exists = conn.execute(sa.text("SELECT to_regclass(:t) IS NOT NULL"), {"t": name}).scalar()
    if not exists:
        return ()
    rows = conn.execute(sa.text(f"SELECT version_num FROM {name}"))
    return tuple(sorted(r[0] for r in rows))


def fingerprint(conn: Connection) -> str:
    """Which server and database this is: host, port, database and the cluster's system identifier.

    The system identifier (from ``pg_control_system()``) tells two servers apart even behind the same
    host name; reading it needs superuser or pg_monitor, and is reported as unknown otherwise.
    Everything else is readable by any role that can connect (a least-privilege deploy role included);
    the socket directory needs pg_read_all_settings: read only over a Unix socket, under a savepoint.
    """
    row = conn.execute(
        sa.text(
            "SELECT current_database(), host(inet_server_addr()), inet_server_port(), current_setting('port')"
        )
    ).one()
    where = f"{row[1]}:{row[2]}" if row[1] else None
    if where is None:  # a Unix socket: inet_server_addr() is NULL
        try:
            with conn.begin_nested():
                sockets = conn.execute(sa.text("SELECT current_setting('unix_socket_directories')")).scalar()
            where = f"socket in {sockets} (port {row[3]})"
        except DBAPIError:
            where = f"a Unix socket (port {row[3]})"
    system_id = system_identifier(conn) or "unknown (needs pg_monitor)"
    return f"database {row[0]} on {where}, system identifier {system_id}"


def system_identifier(conn: Connection) -> str | None:
    """The cluster's system identifier (``pg_control_system()``): one server told apart from another behind
    the same name, or a restored copy from its original's new cluster; None when the role may not read it."""
    try:
        with conn.begin_nested():
            found = conn.execute(sa.text("SELECT system_identifier FROM pg_control_system()")).scalar()
    except DBAPIError:
        found = None
    if conn.in_transaction():
        conn.commit()
    return None if found is None else str(found)


@dataclass(frozen=True)
class TableFacts:
    """What the target holds in one table, as a lint finding on it needs to be judged."""

    name: str
    exists: bool
    rows: int | None = None  # counted up to COUNT_LIMIT; None: could not be read (see unread)
    row_estimate: int | None = None  # pg_class.reltuples; None before the first ANALYZE
    total_bytes: int | None = None
    unread: str = ""  # why the rows could not be read: locked past the timeout, or no permission

    @property
    def has_rows(self) -> bool | None:
        """Whether the table holds any row; None when it could not be read."""
        return None if self.rows is None else self.rows > 0

    def rows_text(self) -> str:
        """How many rows, as a person reads it: ``1 row``, ``~120,000 rows (estimate)``, or why not read."""
        if not self.exists:
            return "not in the target"
        if self.rows is None:
            return f"rows not readable now ({self.unread or 'unknown reason'})"
        if self.rows < COUNT_LIMIT:
            return f"{self.rows:,} row" + ("" if self.rows == 1 else "s")
        if self.row_estimate and self.row_estimate > COUNT_LIMIT:
            return f"~{self.row_estimate:,} rows (estimate)"
        return f"over {COUNT_LIMIT:,} rows"

    def size_text(self) -> str:
        """The table's size with its indexes and TOAST: ``18.0 MB``, or ``size unknown``."""
        return _size_text(self.total_bytes) if self.exists and self.total_bytes is not None else "size unknown"

    def describe(self) -> str:
        """``orders: ~120,000 rows, 18.0 MB`` as a person reads it."""
        if not self.exists:
            return f"{self.name}: not in the target"
        return f"{self.name}: {self.rows_text()}, {self.size_text()}"


# Rows are counted exactly up to this many (a bounded scan); past it the planner's estimate is shown.
COUNT_LIMIT = 10_000


def _size_text(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{int(n):,} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TB"


def table_facts(conn: Connection, names: list[str], lock_wait_s: float = 2.0) -> dict[str, TableFacts]:
    """Existence, rows, row estimate and size of each table named (as SQL writes it, on the search_path).

    A name that is an index gets the facts of the table it is on (a ``DROP INDEX`` concerns that
    table's traffic). Rows are counted with a bounded scan under a short lock_timeout, so a table locked by someone
    else is reported as unreadable rather than waited for.
    """
    found: dict[str, TableFacts] = {}
    conn.execute(
        sa.text("SELECT set_config('lock_timeout', :v, true)"), {"v": f"{int(lock_wait_s * 1000)}ms"}
    )
    for name in dict.fromkeys(names):
        # The catalog is read without locking the table; sizes and rows need its lock, asked for below.
        row = (
            conn.execute(
                sa.text(
                    "SELECT c.oid, c.oid::regclass::text AS qualified, "
                    "CASE WHEN c.reltuples < 0 THEN NULL ELSE c.reltuples::bigint END AS estimate, "
                    "c.relpages::bigint * current_setting('block_size')::bigint AS catalog_bytes "
                    "FROM pg_class c WHERE c.relkind IN ('r', 'p', 'm') AND c.oid = coalesce("
                    "(SELECT i.indrelid FROM pg_index i WHERE i.indexrelid = to_regclass(:n)), to_regclass(:n))"
                ),
                {"n": name},
            )
            .mappings()
            .first()
        )
        if row is None:
            found[name] = TableFacts(name, exists=False)
            continue
        try:
            with conn.begin_nested():
                size = conn.execute(
                    sa.text("SELECT pg_total_relation_size(:oid)"), {"oid": row["oid"]}
                ).scalar()
                rows = conn.execute(
                    sa.text(
                        f"SELECT count(*) FROM (SELECT 1 FROM {row['qualified']} LIMIT {COUNT_LIMIT}) AS t"
                    )
                ).scalar()
        except DBAPIError as err:
            # Locked by someone else past the timeout, or not readable by this role: the finding then
            # blocks, as for a table with rows, showing the catalog's figures (as of the last ANALYZE).
            size, rows = row["catalog_bytes"], None
            unread = "locked" if is_lock_timeout(err) else driver_message(err)
            found[name] = TableFacts(row["qualified"], True, rows, row["estimate"], size, unread)
            continue
        found[name] = TableFacts(row["qualified"], True, rows, row["estimate"], size)
    if conn.in_transaction():
        conn.commit()
    return found


@dataclass(frozen=True)
class RecreatedSchema:
    """What recreating a schema did: what it dropped, and the owner, grants and comment it kept."""

    schema: str
    dropped: tuple[str, ...]
    owner: str
    grants: tuple[str, ...]
    comment: str | None


def recreate_schema(conn: Connection, schema: str = "public") -> RecreatedSchema:
    """Drop ``schema`` with everything in it and create it again, as it was: same owner, grants and comment.

    Runs in one transaction on ``conn`` (committed): it happens entirely or not at all.
    """
    q = lambda name: quote_ident(conn, name)  # noqa: E731
    row = conn.execute(
        sa.text(
            "SELECT oid, pg_get_userbyid(nspowner) AS owner, obj_description(oid, 'pg_namespace') AS comment "
            "FROM pg_namespace WHERE nspname = :s"
        ),
        {"s": schema},
    ).one()
    grants = conn.execute(
        sa.text(
            "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END AS grantee, "
            "a.privilege_type, a.is_grantable FROM pg_namespace n, aclexplode(n.nspacl) a "
            "WHERE n.nspname = :s ORDER BY 1, 2"
        ),
        {"s": schema},
    ).all()
    dropped = [
        f"{kind} {name}"
        for kind, name in conn.execute(
            sa.text(
                "SELECT CASE c.relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'table' WHEN 'v' THEN 'view' "
                "WHEN 'm' THEN 'materialized view' WHEN 'S' THEN 'sequence' ELSE 'foreign table' END, c.relname "
                "FROM pg_class c WHERE c.relnamespace = :oid AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') "
                "UNION ALL SELECT 'function', p.proname FROM pg_proc p WHERE p.pronamespace = :oid "
                "UNION ALL SELECT 'type', t.typname FROM pg_type t WHERE t.typnamespace = :oid AND t.typtype = 'e' "
                "ORDER BY 1, 2"
            ),
            {"oid": row.oid},
        )
    ]
    conn.execute(sa.text(f"DROP SCHEMA {q(schema)} CASCADE"))
    conn.execute(sa.text(f"CREATE SCHEMA {q(schema)}"))
    conn.execute(sa.text(f"ALTER SCHEMA {q(schema)} OWNER TO {q(row.owner)}"))
    for grantee, privilege, grantable in grants:
        to = "PUBLIC" if grantee == "PUBLIC" else q(grantee)
        option = " WITH GRANT OPTION" if grantable else ""
        conn.execute(sa.text(f"GRANT {privilege} ON SCHEMA {q(schema)} TO {to}{option}"))
    if row.comment is not None:
        conn.execute(sa.text(f"COMMENT ON SCHEMA {q(schema)} IS :c"), {"c": row.comment})
    conn.commit()
    shown = tuple(f"{g} {p}{' (with grant option)' if o else ''}" for g, p, o in grants)
    return RecreatedSchema(schema, tuple(dropped), row.owner, shown, row.comment)


@dataclass(frozen=True)
class RelationLock:
    """A table lock a session holds: which table, in which mode, and whether the table has rows."""

    table: str  # schema.name
    mode: str  # as PostgreSQL's documentation names it: "ACCESS EXCLUSIVE", "ROW EXCLUSIVE"…
    has_rows: bool

    @property
    def blocks_readers(self) -> bool:
        """ACCESS EXCLUSIVE: not even a SELECT of the table runs until the transaction ends."""
        return self.mode == "ACCESS EXCLUSIVE"

    def __str__(self) -> str:
        return f"{self.table}: {self.mode}" + (" (has rows)" if self.blocks_readers and self.has_rows else "")


def relation_locks_held(conn: Connection, skip: set[str] = frozenset()) -> list[RelationLock]:
    """The table locks this session holds now (each table once, in its strongest mode), except the
    tables and schemas named in ``skip`` (``schema.name`` or ``schema``); system catalogs are left out."""
    rows = conn.execute(
        sa.text(
            "SELECT n.nspname, c.relname, l.mode FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE l.pid = pg_backend_pid() AND l.granted "
            "AND l.locktype = 'relation' AND c.relkind IN ('r', 'p', 'm') "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'"
        )
    ).all()
    strongest: dict[str, str] = {}
    for schema, name, mode in rows:
        table = f"{schema}.{name}"
        if table in skip or schema in skip:
            continue
        if table not in strongest or _LOCK_ORDER.index(mode) > _LOCK_ORDER.index(strongest[table]):
            strongest[table] = mode
    held = []
    for table, mode in sorted(strongest.items()):
        has_rows = bool(conn.execute(sa.text(f"SELECT EXISTS (SELECT 1 FROM {quote_qualified(conn, table)})")).scalar())
        held.append(RelationLock(table, _mode_text(mode), has_rows))
    return held


# pg_locks' mode names, weakest first (PostgreSQL's table-level lock modes).
_LOCK_ORDER = [
    "AccessShareLock", "RowShareLock", "RowExclusiveLock", "ShareUpdateExclusiveLock", "ShareLock",
    "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock",
]  # fmt: skip


def _mode_text(mode: str) -> str:
    """``AccessExclusiveLock`` as the documentation writes it: ``ACCESS EXCLUSIVE``."""
    return re.sub(r"(?<!^)(?=[A-Z])", " ", mode.removesuffix("Lock")).upper()


@dataclass(frozen=True)
class InvalidIndex:
    """An index PostgreSQL does not use (``pg_index.indisvalid`` false): what a cancelled or failed
    ``CREATE INDEX CONCURRENTLY`` / ``REINDEX CONCURRENTLY`` leaves behind, or one being built right now."""

    oid: int
    name: str  # schema-qualified, quoted where SQL needs it: usable as is in DROP INDEX
    relname: str  # the bare name, as a revision's source writes it
    table: str  # schema-qualified
    building_pid: int | None = None  # a backend building it at this moment (its build is not over)


def invalid_indexes(conn: Connection) -> list[InvalidIndex]:
    """The invalid indexes of the database, by name; read in the caller's transaction, which is left open.

    An index another session is still building concurrently is invalid until its build ends: it is
    listed with that session's pid (``pg_stat_progress_create_index``), so callers can tell it apart.
    """
    rows = conn.execute(
        sa.text(
            "SELECT i.indexrelid::bigint AS oid, format('%I.%I', n.nspname, c.relname) AS name, "
            "c.relname, format('%I.%I', tn.nspname, t.relname) AS tbl "
            "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace tn ON tn.oid = t.relnamespace "
            "WHERE NOT i.indisvalid ORDER BY 2"
        )
    ).all()
    if not rows:  # the usual answer, in one cheap query (it runs after revisions that may build indexes)
        return []
    building = dict(
        conn.execute(
            sa.text(
                "SELECT index_relid::bigint, pid FROM pg_stat_progress_create_index "
                "WHERE datid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND pid <> pg_backend_pid() AND index_relid::bigint = ANY(CAST(:oids AS bigint[]))"
            ),
            {"oids": [r.oid for r in rows]},
        ).all()
    )
    return [InvalidIndex(r.oid, r.name, r.relname, r.tbl, building.get(r.oid)) for r in rows]


def drop_index_concurrently(conn: Connection, name: str) -> None:
    """``DROP INDEX CONCURRENTLY IF EXISTS name`` (``name`` as :func:`invalid_indexes` gives it).

    It must run outside a transaction: ``conn``'s open transaction is committed first, the statement
    runs in autocommit, and the connection's isolation level is put back after it. It waits for the
    sessions using the table under the session's ``lock_timeout``, and a timeout raises (55P03); a
    cancelled drop leaves the index invalid, as it was.
    """
    if conn.in_transaction():
        conn.commit()
    level = conn.get_isolation_level()
    if conn.in_transaction():  # reading the level may have begun one
        conn.commit()
    auto = conn.execution_options(isolation_level="AUTOCOMMIT")
    try:
        with auto.begin():
            auto.execute(sa.text(f"DROP INDEX CONCURRENTLY IF EXISTS {name}"))
    finally:
        conn.execution_options(isolation_level=level)


@dataclass(frozen=True)
class DatabaseIdentity:
    """Which database a session reaches: its name, the server's port and system identifier, and the
    session's backend pid. Read by any role (``pg_control_system()`` may be revoked: then None)."""

    database: str
    port: int | None
    system_identifier: str | None
    pid: int

    def describe(self) -> str:
        """``database shop, port 5432, system identifier 7301…`` as a person reads it."""
        return (
            f"database {self.database}, port {self.port or 'unknown'}, "
            f"system identifier {self.system_identifier or 'not readable'}"
        )


def identity(conn: Connection) -> DatabaseIdentity:
    """The :class:`DatabaseIdentity` of ``conn``'s session, read without leaving a transaction open that
    was not open before (the connection may be the one a project's env.py is about to migrate on)."""
    was_open = conn.in_transaction()
    row = conn.execute(sa.text("SELECT current_database(), current_setting('port'), pg_backend_pid()")).one()
    try:
        with conn.begin_nested():
            system_id = conn.execute(sa.text("SELECT system_identifier::text FROM pg_control_system()")).scalar()
    except DBAPIError:
        system_id = None
    if not was_open and conn.in_transaction():
        conn.rollback()
    port = int(row[1]) if str(row[1]).isdigit() else None
    return DatabaseIdentity(str(row[0]), port, system_id, int(row[2]))


def same_database(ours: DatabaseIdentity, theirs: DatabaseIdentity, their_conn: Connection) -> bool:
    """Whether two sessions reach the same database: same name, port and system identifier; where a
    system identifier cannot be read, ``their_conn`` must see the opslib lock held by one of this
    process's sessions (when it holds one)."""
    if (ours.database, ours.port) != (theirs.database, theirs.port):
        return False
    if ours.system_identifier and theirs.system_identifier:
        return ours.system_identifier == theirs.system_identifier
    if not _HELD_PIDS:
        return True  # nothing else to tell them apart by
    was_open = their_conn.in_transaction()
    seen = their_conn.execute(
        sa.text(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND pid = ANY(CAST(:pids AS int[])) AND classid = (:key >> 32)::int::oid "
            "AND objid = (:key & 4294967295)::oid "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))"
        ),
        {"pids": sorted(_HELD_PIDS), "key": LOCK_KEY},
    ).scalar()
    if not was_open and their_conn.in_transaction():
        their_conn.rollback()
    return bool(seen)
