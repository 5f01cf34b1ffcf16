"""Backups and restores that are killed or fail part-way, against the real server and client programs.

What a kill -9 leaves (a partial dump, a staging database), what the next run removes, what it must
never remove (a concurrent run's), the one-transaction swap, and the exit codes of failures.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import psycopg2
import pytest

from opslib import backup, db, migrate

from .conftest import (
    OPSLIB,
    ROOT,
    check_row,
    databases_named,
    libpq,
    opslib_cli,
    query,
    schema_snapshot,
    settings_for,
)

ALEMBIC_INI = ROOT / "alembic.ini"


def _seed(settings, rows: int = 500) -> None:
    migrate.upgrade(settings, "head", x_args=["dev_data=true"])
    query(
        settings.database_url,
        "INSERT INTO users (email, username, hashed_password) "
        "SELECT 'u' || g || '@example.com', 'u' || g, '!' FROM generate_series(1, :n) g",
        n=rows,
    )


def _state(url: str) -> list:
    """Schema, revision and row counts of every application table: to prove a database unchanged."""
    tables = [
        r[0] for r in query(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")
    ]
    return [schema_snapshot(url), [(t, query(url, f'SELECT count(*) FROM "{t}"')[0][0]) for t in tables]]


def _name(url: str) -> str:
    return db.parse_url(url).database


def _env(url: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update(DATABASE_URL=url, OPSLIB_ALEMBIC_INI=str(ALEMBIC_INI), **extra)
    return env


def _start(url: str, cwd: Path, *args: str, **extra: str) -> subprocess.Popen:
    """The real ``opslib`` command, started and left running."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [OPSLIB, *args],
        cwd=cwd,
        env=_env(url, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    """The single line an opslib failure writes on stderr (no traceback)."""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("opslib: "), done.stderr
    return lines[0]


def _wait_for_child(pid: int, name: str, argument: str) -> psutil.Process:
    """The child ``name`` run with ``argument``: the one doing the work, not a ``--version`` or ``--list`` run."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                if child.name() == name and argument in child.cmdline():
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.01)
    raise AssertionError(f"{name} never started")


def _gone(pid: int, timeout: float = 10) -> bool:
    """True once ``pid`` has exited (a zombie no one reaps has exited too)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _pgrep(program: str, name: str) -> list[str]:
    """Live ``program`` processes whose command line names ``name`` (``pgrep -f``).

    The program is part of the pattern: the server's backends carry the database's name in their titles.
    """
    done = subprocess.run(["pgrep", "-a", "-f", f"{program} .*{name}"], capture_output=True, text=True)
    return done.stdout.splitlines()


def _admin_sql(server_url, sql: str) -> None:
    """One statement outside a transaction (CREATE DATABASE), as the test's own admin."""
    conn = psycopg2.connect(libpq(server_url.render_as_string(hide_password=False)))
    conn.autocommit = True
    try:
        conn.cursor().execute(sql)
    finally:
        conn.close()


def _hold_table_lock(url: str):
    """A session holding ACCESS EXCLUSIVE on products: pg_dump queues behind it until it is released."""
    holder = psycopg2.connect(libpq(url))
    holder.cursor().execute("BEGIN; LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
    return holder


@pytest.fixture
def seeded(settings):
    _seed(settings)
    return settings


# --- backups killed part-way ------------------------------------------------------------------------


def test_kill_9_of_opslib_backup_kills_its_pg_dump_and_the_next_backup_removes_the_partial(seeded, tmp_path):
    url, out = seeded.database_url, tmp_path / "out"
    name = _name(url)
    holder = _hold_table_lock(url)
    proc = _start(url, tmp_path / "work", "backup", "--out", str(out), OPSLIB_LOCK_TIMEOUT="60")
    try:
        dump = _wait_for_child(proc.pid, "pg_dump", "--format=custom")
        deadline = time.monotonic() + 30
        while not list(out.glob(".*.dump.partial")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _pgrep("pg_dump", name), "pg_dump is not running"
        proc.send_signal(signal.SIGKILL)  # opslib itself, not its pg_dump
        proc.communicate(timeout=30)
        # The kernel kills pg_dump with its parent (PR_SET_PDEATHSIG): nothing keeps writing for nobody.
        assert _gone(dump.pid), f"pg_dump {dump.pid} outlived opslib"
        assert _pgrep("pg_dump", name) == []
    finally:
        holder.rollback()
        holder.close()
    (partial,) = out.glob(".*.dump.partial")
    assert name in partial.name
    assert list(out.glob("*.dump")) == [] and list(out.glob("*.json")) == []  # no final name for it
    done = opslib_cli(url, ALEMBIC_INI, tmp_path / "work", "backup", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert not partial.exists()  # its writer is gone: the next backup removed it
    assert sorted(p.suffix for p in out.iterdir()) == [".dump", ".json"]


def test_a_concurrent_backups_partial_file_is_never_removed(seeded, make_database, tmp_path):
    url, out = seeded.database_url, tmp_path / "out"
    other = make_database()  # another database, backed up into the same folder meanwhile
    holder = _hold_table_lock(url)
    slow = _start(url, tmp_path / "work", "backup", "--out", str(out), OPSLIB_LOCK_TIMEOUT="60")
    try:
        _wait_for_child(slow.pid, "pg_dump", "--format=custom")
        (partial,) = out.glob(".*.dump.partial")
        time.sleep(1.1)  # older than the second backup's start, by the clock of file times too
        quick = opslib_cli(other, ALEMBIC_INI, tmp_path / "work", "backup", "--out", str(out))
        assert quick.returncode == 0, quick.stderr
        assert partial.exists()  # still locked by its live writer: left alone
    finally:
        holder.rollback()
        holder.close()
    stdout, stderr = slow.communicate(timeout=60)
    assert slow.returncode == 0, stderr
    assert not list(out.glob(".*.partial"))
    assert len(list(out.glob("*.dump"))) == 2


# --- restores killed part-way: leftover staging databases -----------------------------------------------


def _staging(server_url, target: str) -> set[str]:
    return databases_named(server_url, backup.staging_prefix(target))


def _wait_until_leftover(settings, name: str) -> None:
    """Until the killed restore's sessions are gone server-side and its staging database counts as a leftover."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(s.name == name and not s.sessions for s in backup.leftover_restores(settings)):
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} never became a leftover")


def _check_line(done: subprocess.CompletedProcess) -> str:
    return check_row(done.stdout, "leftover restores")


def test_a_killed_restore_leaves_a_staging_database_that_check_names_and_cleanup_drops(
    make_database, server_url, tmp_path
):
    url = make_database()
    settings = settings_for(url, tmp_path)
    _seed(settings, rows=200_000)  # pg_restore runs long enough to be caught in the act
    made = backup.backup(settings).path
    query(url, "DELETE FROM users WHERE id > 2")
    target, before = _name(url), _state(url)
    work = tmp_path / "work"

    proc = _start(url, work, "restore", str(made), "--confirm", target)
    restorer = _wait_for_child(proc.pid, "pg_restore", "--exit-on-error")
    (staging,) = _staging(server_url, target)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert _gone(restorer.pid), f"pg_restore {restorer.pid} outlived opslib"
    assert _pgrep("pg_restore", staging) == []
    assert _state(url) == before  # the target is untouched, under its name
    _wait_until_leftover(settings, staging)

    check = opslib_cli(url, ALEMBIC_INI, work, "check")
    line = _check_line(check)
    assert "WARN" in line and staging in line and "opslib restore --cleanup" in line, check.stdout
    assert check.returncode == 0, check.stdout + check.stderr  # a leftover is no reason to refuse a deploy
    setup = opslib_cli(url, ALEMBIC_INI, work, "verify-setup")
    assert staging in _check_line(setup) and setup.returncode == 0, setup.stdout

    cleanup = opslib_cli(url, ALEMBIC_INI, work, "restore", "--cleanup")
    assert cleanup.returncode == 0, cleanup.stderr
    assert cleanup.stdout.strip() == f"dropped {staging}"
    assert _staging(server_url, target) == set()
    assert "PASS" in _check_line(opslib_cli(url, ALEMBIC_INI, work, "check"))
    again = opslib_cli(url, ALEMBIC_INI, work, "restore", "--cleanup")
    assert again.returncode == 0 and "no staging databases" in again.stdout
    assert _state(url) == before


def test_the_next_restore_drops_stale_staging_databases_but_never_a_running_restores(
    make_database, server_url, tmp_path
):
    url = make_database()
    settings = settings_for(url, tmp_path)
    _seed(settings, rows=200_000)
    made = backup.backup(settings).path
    target, work = _name(url), tmp_path / "work"
    # What a killed restore leaves: a staging database no running restore holds.
    stale, later = (backup.staging_prefix(target) + suffix for suffix in ("0badc0", "0badc1"))
    _admin_sql(server_url, f'CREATE DATABASE "{stale}"')

    # A restore caught while pg_restore loads its staging database, and held there (SIGSTOP).
    running = _start(url, work, "restore", str(made), "--confirm", target)
    held = [running]
    try:
        held.append(_wait_for_child(running.pid, "pg_restore", "--exit-on-error"))
        for p in held:
            p.send_signal(signal.SIGSTOP)
        (live,) = _staging(server_url, target)  # the restore dropped the stale one before starting
        assert live != stale
        _admin_sql(server_url, f'CREATE DATABASE "{later}"')  # killed meanwhile, say
        cleanup = opslib_cli(url, ALEMBIC_INI, work, "restore", "--cleanup")
        assert cleanup.returncode == 0, cleanup.stderr
        assert sorted(cleanup.stdout.splitlines()) == [
            f"dropped {later}",
            f"left {live} (a restore running now is using it)",
        ]
        assert _staging(server_url, target) == {live}
        check = _check_line(opslib_cli(url, ALEMBIC_INI, work, "check"))
        assert "PASS" in check and live not in check  # a running restore's staging database is no leftover
    finally:
        for p in held:
            p.send_signal(signal.SIGCONT)
    stdout, stderr = running.communicate(timeout=120)
    assert running.returncode == 0, stderr
    assert f"dropped first, left by killed restores: {stale}" in stdout
    assert _staging(server_url, target) == set()
    assert query(url, "SELECT count(*) FROM users")[0][0] == 200_002


# --- the swap is one transaction ---------------------------------------------------------------------


class _Squatter(threading.Thread):
    """Connects to the staging database of a restore over ``target`` as soon as it exists, and stays."""

    def __init__(self, server_url, target: str):
        super().__init__(daemon=True)
        self.server_url, self.target = server_url, target
        self.staging: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        admin = psycopg2.connect(libpq(self.server_url.render_as_string(hide_password=False)))
        admin.autocommit = True
        session = None
        try:
            while not self.stop.is_set() and session is None:
                with admin.cursor() as cur:
                    cur.execute(
                        "SELECT datname FROM pg_database WHERE left(datname, length(%s)) = %s",
                        (backup.staging_prefix(self.target),) * 2,
                    )
                    row = cur.fetchone()
                if row:
                    url = self.server_url.set(database=row[0]).render_as_string(hide_password=False)
                    session = psycopg2.connect(libpq(url))
                    self.staging = row[0]
                time.sleep(0.005)
            self.stop.wait(120)
        finally:
            admin.close()
            if session is not None:
                try:
                    session.close()
                except psycopg2.Error:
                    pass  # opslib dropped the database under it WITH (FORCE)


def test_a_failed_second_rename_leaves_the_target_under_its_name(seeded, make_database, server_url, tmp_path):
    """The second rename fails for real (a session on the staging database): the first is rolled back with it."""
    url = seeded.database_url
    made = backup.backup(seeded).path
    query(url, "DELETE FROM users WHERE id > 2")  # the target now differs from the backup
    target, before = _name(url), _state(url)
    squatter = _Squatter(server_url, target)
    squatter.start()
    try:
        done = opslib_cli(url, ALEMBIC_INI, tmp_path / "work", "restore", str(made), "--confirm", target)
    finally:
        squatter.stop.set()
        squatter.join(10)
    assert squatter.staging is not None
    line = _one_line_error(done)
    assert done.returncode == 1
    assert "cannot rename the restored database into place" in line
    assert f"the target database '{target}' is unchanged" in line
    assert _state(url) == before
    # Nothing set aside, nothing left: the target is the only database of this test.
    assert databases_named(server_url, make_database.prefix) == {target}


# --- exit codes ------------------------------------------------------------------------------------


def test_a_backup_stopped_by_a_full_file_system_is_not_taken_exit_3(seeded, tmp_path):
    """RLIMIT_FSIZE makes pg_dump's writes fail as a full disk does (it is killed by SIGXFSZ)."""
    url, out = seeded.database_url, tmp_path / "out"
    before = _state(url)
    limit = 4096  # far below the dump's size; the opslib process itself writes nothing that large

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    (tmp_path / "work").mkdir()
    done = subprocess.run(
        [OPSLIB, "backup", "--out", str(out)],
        cwd=tmp_path / "work",
        env=_env(url),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=small_files,
    )
    line = _one_line_error(done)
    assert done.returncode == 3, done.stderr
    assert "pg_dump was killed by signal" in line and "no backup was written" in line
    assert list(out.iterdir()) == []
    assert _state(url) == before


def test_a_backup_into_a_folder_that_cannot_be_made_is_not_taken_exit_3(seeded, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = opslib_cli(
        seeded.database_url, ALEMBIC_INI, tmp_path / "work", "backup", "--out", str(blocker / "sub")
    )
    line = _one_line_error(done)
    assert done.returncode == 3
    assert "cannot create the backups folder" in line and "Not a directory" in line


@pytest.mark.parametrize("command", [["backups"], ["backups", "--json"], ["prune-backups", "--keep", "1"]])
def test_listing_or_pruning_a_folder_that_does_not_exist_is_invalid_input(seeded, tmp_path, command):
    missing = tmp_path / "no-such-folder"
    done = opslib_cli(seeded.database_url, ALEMBIC_INI, tmp_path / "work", *command, "--dir", str(missing))
    line = _one_line_error(done)
    assert done.returncode == 2
    assert f"--dir {missing} does not exist" in line
    assert done.stdout == ""


def test_restore_needs_a_file_unless_cleaning_up(seeded, tmp_path):
    url, work = seeded.database_url, tmp_path / "work"
    before = _state(url)
    done = opslib_cli(url, ALEMBIC_INI, work, "restore", "--confirm", _name(url))
    assert done.returncode == 2 and "restore needs a FILE" in _one_line_error(done)
    done = opslib_cli(url, ALEMBIC_INI, work, "restore", "--cleanup", str(tmp_path / "x.dump"))
    assert done.returncode == 2 and "restore --cleanup takes no FILE" in _one_line_error(done)
    assert _state(url) == before


def test_restoring_another_databases_backup_over_the_target_needs_allow_other_database(
    seeded, make_database, tmp_path
):
    target_url = seeded.database_url
    source_url = make_database()
    source = settings_for(source_url, tmp_path / "source")
    _seed(source, rows=10)
    made = backup.backup(source).path
    target, work = _name(target_url), tmp_path / "work"
    before = _state(target_url)
    done = opslib_cli(target_url, ALEMBIC_INI, work, "restore", str(made), "--confirm", target)
    line = _one_line_error(done)
    assert done.returncode == 3
    assert f"database '{_name(source_url)}'" in line and f"not of the target '{target}'" in line
    assert "--allow-other-database" in line
    assert _state(target_url) == before
    done = opslib_cli(
        target_url, ALEMBIC_INI, work, "restore", str(made), "--confirm", target, "--allow-other-database"
    )
    assert done.returncode == 0, done.stderr
    assert query(target_url, "SELECT count(*) FROM users")[0][0] == 12
