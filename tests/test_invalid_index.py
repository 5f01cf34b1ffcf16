"""Invalid indexes: a CREATE INDEX CONCURRENTLY that the lock timeout cancelled is never recorded as applied.

The scenario project (tests/fixtures/invalid_index) builds ``ix_items_code`` with
``CREATE INDEX CONCURRENTLY IF NOT EXISTS`` in an autocommit block (revision i002) on a table of
5,000 rows. Another session in a REPEATABLE READ transaction that has read the table holds a
snapshot and a lock on it: the build waits for it, the short lock timeout cancels the build, and
PostgreSQL leaves the index behind with ``pg_index.indisvalid = false``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import psycopg2
import pytest

from opslib import migrate
from opslib.errors import MigrationFailed

from .conftest import check_row, libpq, opslib_cli, query, settings_for

PG_INDEX = (
    "SELECT indexrelid::regclass::text, indisvalid FROM pg_index "
    "WHERE indrelid = 'items'::regclass ORDER BY 1"
)
LEFT_INVALID = [("items_pkey", True), ("ix_items_code", False)]
BUILT = [("items_pkey", True), ("ix_items_code", True)]
FAST = {"OPSLIB_DDL_LOCK_TIMEOUT": "1", "OPSLIB_DDL_RETRIES": "2"}


def _pg_index(url: str) -> list[tuple]:
    return [tuple(row) for row in query(url, PG_INDEX)]


def _version(url: str) -> list[str]:
    return [row[0] for row in query(url, "SELECT version_num FROM alembic_version")]


def _applied_events(url: str) -> list[str]:
    rows = query(url, "SELECT revision FROM opslib.revision_events WHERE direction = 'upgrade' ORDER BY id")
    return [row[0] for row in rows]


def _hold_snapshot(url: str):
    """Another session in a REPEATABLE READ transaction that has read ``items``: a concurrent index
    build (and a concurrent drop) waits for it to end."""
    holder = psycopg2.connect(libpq(url))
    cur = holder.cursor()
    cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    cur.execute("SELECT count(*) FROM items")
    return holder


def _leave_invalid_index(url: str) -> None:
    """What an earlier, cancelled build left: the build run by hand, cancelled by its lock timeout."""
    holder = _hold_snapshot(url)
    builder = psycopg2.connect(libpq(url))
    builder.autocommit = True
    try:
        with builder.cursor() as cur:
            cur.execute("SET lock_timeout = '300ms'")
            with pytest.raises(psycopg2.errors.LockNotAvailable):
                cur.execute("CREATE INDEX CONCURRENTLY ix_items_code ON items (code)")
    finally:
        holder.rollback()
        holder.close()
        builder.close()
    assert _pg_index(url) == LEFT_INVALID


@pytest.fixture
def at_i001(database_url, project, tmp_path):
    """Settings on the scenario project (lock timeout 1 s, two retries), the database at i001."""
    ini = project("invalid_index")
    settings = replace(settings_for(database_url, tmp_path, ini), ddl_lock_timeout_s=1.0, ddl_retries=2)
    migrate.upgrade(settings, "i001")
    return settings


def test_a_build_cancelled_by_the_lock_timeout_is_dropped_and_built_again(at_i001, database_url):
    holder = _hold_snapshot(database_url)
    attempts = []

    def on_attempt(what: str, attempt: int, error: str) -> None:
        attempts.append((what, attempt, error, _pg_index(database_url)))
        holder.rollback()  # the long transaction ends before the retry

    try:
        result = migrate.upgrade(at_i001, "head", on_attempt=on_attempt)
    finally:
        holder.close()
    (what, attempt, error, seen), *more = attempts
    assert (what, attempt, more) == ("upgrade i002", 1, [])
    assert "lock timeout" in error
    assert seen == LEFT_INVALID  # what the cancelled build left, before the retry dropped it
    assert result.after == ("i003",)
    assert _pg_index(database_url) == BUILT
    assert _applied_events(database_url) == ["i001", "i002", "i003"]


def test_a_build_blocked_past_every_retry_fails_naming_the_index_at_the_previous_revision(
    at_i001, database_url, tmp_path
):
    holder = _hold_snapshot(database_url)
    try:
        done = opslib_cli(database_url, at_i001.alembic_ini, tmp_path / "work", "upgrade", env=FAST)
        left = _pg_index(database_url)
    finally:
        holder.rollback()
        holder.close()
    assert done.returncode == 1, done.stdout + done.stderr
    (message,) = [line for line in done.stderr.splitlines() if line.strip()]
    assert "failed at revision i002" in message
    assert "revision i002 left index public.ix_items_code INVALID" in message
    assert "within lock_timeout 1 s in 3 attempts" in message
    assert "not recorded as applied" in message
    assert "DROP INDEX CONCURRENTLY public.ix_items_code" in message
    assert message.rstrip().endswith("pending") and " is now at i001;" in message
    assert left == LEFT_INVALID
    assert _version(database_url) == ["i001"]  # the version row was not advanced
    assert _applied_events(database_url) == ["i001"]  # nor any history row written for i002


def test_an_invalid_index_an_if_not_exists_skips_is_caught_before_the_revision_is_recorded(
    at_i001, database_url
):
    """The user's report: the revision's IF NOT EXISTS skips an invalid index of the same name and the
    revision "succeeds". Without retries it fails, naming the index; with them it is dropped and rebuilt."""
    _leave_invalid_index(database_url)
    with pytest.raises(MigrationFailed) as failed:
        migrate.upgrade(replace(at_i001, ddl_retries=0), "head")
    err = failed.value
    assert err.exit_code == 1 and err.revisions == ("i001",)
    assert "failed at revision i002" in err.message and "public.ix_items_code" in err.message
    assert "\n" not in err.message
    assert _version(database_url) == ["i001"] and _pg_index(database_url) == LEFT_INVALID
    assert _applied_events(database_url) == ["i001"]

    result = migrate.upgrade(at_i001, "head")
    assert result.after == ("i003",)
    assert _pg_index(database_url) == BUILT


def test_the_deploy_runbook_stops_at_the_previous_revision_with_the_index_named(
    at_i001, database_url, tmp_path
):
    holder = _hold_snapshot(database_url)
    work = tmp_path / "work"
    try:
        done = opslib_cli(database_url, at_i001.alembic_ini, work, "run", "deploy", env=FAST)
    finally:
        holder.rollback()
        holder.close()
    assert done.returncode == 1, done.stdout + done.stderr
    (record,) = [json.loads(p.read_text()) for p in Path(work, "records").glob("*.json")]
    assert record["outcome"] == "failed" and record["revisions_after"] == ["i001"]
    assert "public.ix_items_code" in record["error"] and "revision i002" in record["error"]
    attempts = [s["name"] for s in record["steps"] if "attempt" in s["name"]]
    assert attempts == [f"upgrade i002 attempt {n}" for n in (1, 2, 3)]
    assert _version(database_url) == ["i001"]
    assert _pg_index(database_url) == LEFT_INVALID


UNIQUE_REVISION = '''"""make item codes unique concurrently"""

from alembic import op

revision = "i004"
down_revision = "i003"


def upgrade():
    op.execute("UPDATE items SET code = 'duplicate' WHERE id IN (1, 2)")
    with op.get_context().autocommit_block():
        op.execute("CREATE UNIQUE INDEX CONCURRENTLY uq_items_code ON items (code)")


def downgrade():
    op.execute("DROP INDEX uq_items_code")
'''


def test_a_build_that_fails_otherwise_is_not_retried_and_its_invalid_index_is_named(at_i001, database_url):
    """A duplicate makes CREATE UNIQUE INDEX CONCURRENTLY fail (no retry helps); the index it leaves is
    named, and so is what the autocommit block had already committed."""
    Path(at_i001.alembic_ini).parent.joinpath("versions", "i004_make_codes_unique.py").write_text(
        UNIQUE_REVISION
    )
    with pytest.raises(MigrationFailed) as failed:
        migrate.upgrade(at_i001, "head")
    message = failed.value.message
    assert "failed at revision i004" in message and "UniqueViolation" in message
    assert "left index public.uq_items_code INVALID" in message and "autocommit_block" in message
    assert " is now at i003;" in message and "\n" not in message
    assert _version(database_url) == ["i003"]
    assert ("uq_items_code", False) in _pg_index(database_url)
    # The UPDATE before the autocommit block committed with it, as the message says.
    assert query(database_url, "SELECT count(*) FROM items WHERE code = 'duplicate'")[0][0] == 2


def test_the_check_fails_on_an_invalid_index_naming_it(at_i001, database_url, tmp_path):
    work = tmp_path / "work"
    clean = opslib_cli(database_url, at_i001.alembic_ini, work, "check")
    line = check_row(clean.stdout, "invalid indexes")
    assert "PASS" in line, clean.stdout
    _leave_invalid_index(database_url)
    done = opslib_cli(database_url, at_i001.alembic_ini, work, "check")
    assert done.returncode == 3, done.stdout + done.stderr
    line = check_row(done.stdout, "invalid indexes")
    assert "FAIL" in line and "public.ix_items_code on public.items" in line
    assert "DROP INDEX CONCURRENTLY public.ix_items_code" in line and "REINDEX" in line


HELPER_MODULE = '''"""The project's DDL helpers: revisions call these rather than write the SQL."""


def lookup_on(table, column):
    return f"CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_{table}_{column} ON {table} ({column})"


def lookup_off(table, column):
    return f"DROP INDEX CONCURRENTLY IF EXISTS ix_{table}_{column}"
'''

HELPER_REVISION = '''"""code lookups"""

from alembic import op

from ddl_helpers import lookup_off, lookup_on

revision = "i002"
down_revision = "i001"


def upgrade():
    with op.get_context().autocommit_block():
        op.execute(lookup_on("items", "code"))


def downgrade():
    with op.get_context().autocommit_block():
        op.execute(lookup_off("items", "code"))
'''


def _through_a_helper(settings) -> None:
    """Revision i002 rewritten as a project builds its lookups: the SQL comes from a helper module,
    and the revision's own file says neither "index" nor "concurrent"."""
    folder = Path(settings.alembic_ini).parent
    ini = folder / "alembic.ini"
    ini.write_text(ini.read_text().replace("path_separator = os", "path_separator = os\nprepend_sys_path = %(here)s"))
    (folder / "ddl_helpers.py").write_text(HELPER_MODULE)
    (revision,) = folder.joinpath("versions").glob("i002_*.py")
    revision.write_text(HELPER_REVISION)
    assert not {"index", "concurrent"} & set(HELPER_REVISION.lower().replace("_", " ").split())


def test_an_invalid_index_skipped_by_sql_a_helper_built_is_never_recorded_as_applied(
    at_i001, database_url, tmp_path
):
    _through_a_helper(at_i001)
    _leave_invalid_index(database_url)
    with pytest.raises(MigrationFailed) as failed:
        migrate.upgrade(replace(at_i001, ddl_retries=0), "head")
    assert "failed at revision i002" in failed.value.message
    assert "public.ix_items_code" in failed.value.message
    assert _version(database_url) == ["i001"] and _applied_events(database_url) == ["i001"]
    assert _pg_index(database_url) == LEFT_INVALID

    # The user's command: with its retries the invalid index is dropped and built again.
    done = opslib_cli(database_url, at_i001.alembic_ini, tmp_path / "work", "upgrade", "head", env=FAST)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _version(database_url) == ["i003"]
    assert _pg_index(database_url) == BUILT


def _building(url: str) -> list:
    return query(
        url,
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' "
        "AND query ILIKE 'CREATE INDEX CONCURRENTLY%'",
    )


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_deploy_interrupted_during_a_concurrent_build_drops_the_index_it_left_and_says_so(
    signame, at_i001, database_url, tmp_path
):
    import os
    import signal
    import subprocess
    import time

    from .conftest import OPSLIB
    from .test_faults import _signal_run, _wait_for

    _through_a_helper(at_i001)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update(
        DATABASE_URL=database_url,
        OPSLIB_ALEMBIC_INI=str(at_i001.alembic_ini),
        OPSLIB_RECORDS_DIR=str(work / "records"),
        OPSLIB_BACKUPS_DIR=str(work / "backups"),
        OPSLIB_DDL_LOCK_TIMEOUT="60",
    )
    holder = _hold_snapshot(database_url)
    runner = subprocess.Popen(
        [OPSLIB, "run", "deploy"], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for(lambda: _building(database_url), "the concurrent build", proc=runner)
        _signal_run(work, runner, getattr(signal, signame))
        # The build is cancelled (its index left invalid) before the snapshot it waits for ends.
        _wait_for(lambda: not _building(database_url), "the build's cancel")
        time.sleep(0.2)
        holder.rollback()  # the drop of what it left waits for the same snapshot
        out, err = runner.communicate(timeout=120)
    finally:
        holder.close()
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert runner.returncode == 128 + getattr(signal, signame), out + err
    last = err.strip().splitlines()[-1]
    assert "ix_items_code, left INVALID by the interrupted build, was dropped" in last, err
    assert "is now at i001" in last
    assert _pg_index(database_url) == [("items_pkey", True)]
    assert _version(database_url) == ["i001"]
    (record,) = [json.loads(p.read_text()) for p in Path(work, "records").glob("*.json")]
    assert record["outcome"] == "interrupted"
    assert "ix_items_code, left INVALID by the interrupted build, was dropped" in record["error"]

    again = subprocess.run([OPSLIB, "run", "deploy"], cwd=work, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert _pg_index(database_url) == BUILT
