"""The `opslib` command as users run it: output, exit codes, and bad input that changes nothing."""

from __future__ import annotations

import json

import psycopg2
import pytest

from opslib import db

from .conftest import libpq, query, schema_snapshot

PASSWORD = "Sup3r-S3cret-pw"


def _with_password(url: str) -> str:
    """The same URL with a password (the test server trusts local connections, so it is ignored)."""
    return db.parse_url(url).set(password=PASSWORD).render_as_string(hide_password=False)


def test_status_json_has_the_contract_keys(run_cli):
    done = run_cli("status", "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert {"current", "heads", "pending", "at_head"} <= status.keys()
    assert status["current"] == [] and status["heads"] == ["0007"] and status["at_head"] is False
    assert status["pending"][0] == {
        "revision": "0001",
        "message": "create core tables: users, products, settings, cms_pages, email_templates",
    }
    assert run_cli("upgrade").returncode == 0
    status = json.loads(run_cli("status", "--json").stdout)
    assert status["current"] == ["0007"] and status["pending"] == [] and status["at_head"] is True


def test_upgrade_downgrade_and_status_text(run_cli):
    up = run_cli("upgrade", "0003")
    assert up.returncode == 0, up.stderr
    assert "applied     0003  add performance indexes" in up.stdout and "after : 0003" in up.stdout
    down = run_cli("downgrade", "-1")
    assert down.returncode == 0 and "rolled back 0003" in down.stdout
    st = run_cli("status")
    assert "current  : 0002" in st.stdout and "5 revision(s) pending" in st.stdout
    assert run_cli("upgrade", "head").returncode == 0
    again = run_cli("upgrade")
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_failure_at_n_is_reported_by_status(run_cli, project):
    env = {"OPSLIB_ALEMBIC_INI": str(project("broken_revision"))}
    done = run_cli("upgrade", env=env)
    assert done.returncode == 1
    assert "failed at revision b003" in done.stderr and "is now at b002" in done.stderr
    st = run_cli("status", env=env)
    assert st.returncode == 0 and "current  : b002" in st.stdout
    assert "b003     add index on a column that does not exist" in st.stdout


def test_history_show_heads(run_cli):
    history = run_cli("history").stdout.splitlines()
    assert history[0] == "0006 -> 0007 (head), switch email columns (email change, step 3 of 3)"
    assert history[-1].startswith("<base> -> 0001")
    verbose = run_cli("history", "--verbose").stdout
    assert "Create Date: 2026-11-26 09:15:00" in verbose
    show = run_cli("show", "0004").stdout
    assert "Revision: 0004" in show and "Revises: 0003" in show and "NOT NULL" in show
    assert (
        run_cli("heads").stdout.strip()
        == "0006 -> 0007 (head), switch email columns (email change, step 3 of 3)"
    )


def test_sql_prints_offline_sql(run_cli):
    done = run_cli("sql", "0002:0003")
    assert done.returncode == 0
    assert (
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_users_email_active ON users (email, is_active);"
        in done.stdout
    )
    assert "COMMIT;" in done.stdout.split("CONCURRENTLY")[0]  # built outside the revision's transaction


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["upgrade", "zzzz"], 2, "unknown revision 'zzzz'"),
        (["downgrade", "zzzz"], 2, "unknown revision 'zzzz'"),
        (["show", "zzzz"], 2, "unknown revision 'zzzz'"),
        (["stamp", "zzzz"], 2, "unknown revision 'zzzz'"),
        (["upgrade", "0002"], 2, "is not ahead of the database's revision 0003"),
        (["downgrade", "0005"], 2, "is not behind the database's revision 0003"),
        (["downgrade", "-9"], 3, "only 3 revision(s) applied"),
        (["upgrade", "+9"], 3, "only 4 revision(s) pending"),
        (["upgrade", "-x", "dev_data"], 2, "-x takes KEY=VALUE"),
        (["upgrade", "-x", "dev_data=perhaps"], 2, "dev_data must be true or false"),
        (["sql", "0003"], 2, "give a revision range FROM:TO"),
        (["revision", "-m", " "], 2, "a message is required"),
    ],
)
def test_bad_input_is_one_line_with_its_exit_code_and_changes_nothing(
    run_cli, database_url, args, code, message
):
    assert run_cli("upgrade", "0003").returncode == 0
    before = schema_snapshot(database_url)
    done = run_cli(*args)
    assert done.returncode == code, done.stderr
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert schema_snapshot(database_url) == before


def test_ambiguous_revision_prefix(run_cli, project):
    done = run_cli("upgrade", "abcd", env={"OPSLIB_ALEMBIC_INI": str(project("two_heads"))})
    assert done.returncode == 2 and "ambiguous" in done.stderr


def test_downgrade_at_base_is_refused(run_cli):
    done = run_cli("downgrade", "-1")
    assert done.returncode == 3 and "nothing to roll back" in done.stderr


@pytest.mark.connections
@pytest.mark.parametrize(
    "url, message",
    [
        ("not a url", "DATABASE_URL is not a valid URL"),
        (f"postgresql://postgres:{PASSWORD}@127.0.0.1:notaport/x", "DATABASE_URL is not a valid URL"),
        (f"mysql://root:{PASSWORD}@127.0.0.1/x", "DATABASE_URL must be a postgresql:// URL"),
        (f"postgresql://postgres:{PASSWORD}@127.0.0.1/", "DATABASE_URL names no database"),
        (f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/x", "cannot connect to"),
    ],
)
def test_bad_database_url_is_exit_2_without_the_password(run_cli, database_url, url, message):
    before = schema_snapshot(database_url)
    for verb in (["status"], ["upgrade"], ["downgrade", "-1"]):
        done = run_cli(*verb, env={"DATABASE_URL": url})
        assert done.returncode == 2, done.stderr
        assert message in done.stderr
        assert PASSWORD not in done.stdout + done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert schema_snapshot(database_url) == before


def test_missing_alembic_ini_is_exit_2(run_cli, database_url, tmp_path):
    done = run_cli("upgrade", env={"OPSLIB_ALEMBIC_INI": str(tmp_path / "nowhere.ini")})
    assert done.returncode == 2
    assert "Alembic config not found" in done.stderr and "OPSLIB_ALEMBIC_INI" in done.stderr
    assert schema_snapshot(database_url) == [[], [], []]


def test_password_never_appears_in_any_output(run_cli, database_url, make_database, project):
    env = {"DATABASE_URL": _with_password(database_url)}
    broken = {
        "DATABASE_URL": _with_password(make_database()),
        "OPSLIB_ALEMBIC_INI": str(project("broken_revision")),
    }
    outputs = [
        run_cli("status", env=env),
        run_cli("status", "--json", env=env),
        run_cli("upgrade", "0003", env=env),
        run_cli("downgrade", "-1", env=env),
        run_cli("upgrade", "zzzz", env=env),
        run_cli("-v", "upgrade", env=broken),
    ]
    assert [o.returncode for o in outputs] == [0, 0, 0, 0, 2, 1]
    assert "postgres:***@" in outputs[0].stdout
    for o in outputs:
        assert PASSWORD not in o.stdout + o.stderr


def test_lock_held_is_exit_4(run_cli, database_url):
    holder = psycopg2.connect(libpq(database_url))
    try:
        holder.cursor().execute("SELECT pg_advisory_lock(%s)", (db.LOCK_KEY,))
        done = run_cli("upgrade", env={"OPSLIB_LOCK_TIMEOUT": "0.5"})
    finally:
        holder.close()
    assert done.returncode == 4 and "holds the lock" in done.stderr
    assert query(database_url, "SELECT to_regclass('alembic_version')")[0][0] is None


def test_bad_configuration_values_are_exit_2(run_cli):
    assert run_cli("status", env={"OPSLIB_ENV": "prod"}).returncode == 2
    assert run_cli("status", env={"OPSLIB_LOCK_TIMEOUT": "soon"}).returncode == 2
    assert run_cli("frobnicate").returncode == 2  # argparse: unknown command
