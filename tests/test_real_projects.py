"""Alembic projects as real teams have them (tests/fixtures: branchy, inspects_base, online_version_table,
own_url), operated as a new user would: the target is the database the project names, the version table
is the one env.py configures online, offline SQL never lies, and pending means what Alembic will run."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from opslib import migrate

from .conftest import OPSLIB, libpq, opslib_cli, query, schema_snapshot, settings_for
from .test_async_project import async_project  # noqa: F401 - the fixture, shared

BIN = Path(OPSLIB).parent

# tests/fixtures/branchy/README.txt: the labels of its history.
B2, C2, B3, HEAD = "7431cca8d4cb", "fd76f8ad39e5", "0140a13e28b1", "e6f0f5c10d59"


def _bare_alembic(ini: Path, url: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Alembic itself, as a user runs it, on a copy of the project's ini that names ``url``."""
    own = ini.with_name("bare-alembic.ini")
    text = re.sub(r"(?m)^sqlalchemy\.url\s*=.*$", f"sqlalchemy.url = {url.replace('%', '%%')}", ini.read_text())
    own.write_text(text)
    return subprocess.run(
        [str(BIN / "alembic"), "-c", str(own), *args], capture_output=True, text=True, timeout=300, env=env
    )


def _alembic_runs(ini: Path, url: str, start: str) -> int:
    """How many revisions ``alembic upgrade START:heads`` runs (its offline "Running upgrade" lines)."""
    done = _bare_alembic(ini, url, "upgrade", f"{start}:heads", "--sql")
    assert done.returncode == 0, done.stderr
    return len(re.findall(r"^-- Running upgrade ", done.stdout, re.M))


def test_a_database_at_two_revisions_counts_what_alembic_runs(database_url, project, tmp_path):
    """A downgrade across a merge leaves two revisions applied; status, the deploy and its record agree
    with what Alembic itself runs from that state."""
    ini = project("branchy")
    settings = settings_for(database_url, tmp_path, ini)
    migrate.upgrade(settings, "heads")
    assert set(migrate.downgrade(settings, B2).after) == {B2, C2}  # the other branch stays applied
    status = opslib_cli(database_url, ini, tmp_path / "w", "status", "--json")
    pending = [r["revision"] for r in json.loads(status.stdout)["pending"]]
    deploy = opslib_cli(database_url, ini, tmp_path / "w", "run", "deploy", "-p", "backup", "false")
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "w" / "records").glob("*.json")]
    applied = [s["name"].split()[1] for s in record["steps"] if s["name"].startswith("upgrade ")]
    assert applied == pending and record["revisions_after"] == [HEAD]
    # Bare Alembic, from the same state, runs as many (its log of an online upgrade).
    migrate.downgrade(settings, B2)
    bare = _bare_alembic(ini, database_url, "upgrade", "heads")
    assert bare.returncode == 0, bare.stderr
    assert len(re.findall(r"Running upgrade ", bare.stderr)) == len(pending) == 8


def test_a_state_inside_one_branch_counts_the_other_branch_too(database_url, project, tmp_path):
    ini = project("branchy")
    settings = settings_for(database_url, tmp_path, ini)
    migrate.upgrade(settings, B3)
    status = migrate.status(settings)
    assert len(status.pending) == _alembic_runs(ini, database_url, B3) == 9
    result = migrate.upgrade(settings, "heads")
    assert len(result.steps) == 9 and result.after == (HEAD,)


def _cli(ini: Path, cwd: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    """The real `opslib` with exactly the environment given (DATABASE_URL included or not)."""
    import os

    full = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL", "APP_DB_URL"))}
    full.update(OPSLIB_ALEMBIC_INI=str(ini), **env)
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([OPSLIB, *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=300)


def test_a_version_table_configured_only_online_is_the_one_read(database_url, project, tmp_path):
    ini = project("online_version_table")
    head = "4acb7b487c4b"
    up = opslib_cli(database_url, ini, tmp_path / "w", "upgrade", "head")
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"after : {head}" in up.stdout
    assert query(database_url, "SELECT version_num FROM app_meta.schema_migrations") == [(head,)]
    assert query(database_url, "SELECT to_regclass('public.alembic_version') IS NULL")[0][0]
    # A new process (a new cache folder too) reads the same table.
    status = opslib_cli(database_url, ini, tmp_path / "other", "status", "--json")
    assert json.loads(status.stdout)["current"] == [head]
    rollback = opslib_cli(database_url, ini, tmp_path / "w", "run", "rollback")
    assert rollback.returncode == 0, rollback.stdout + rollback.stderr
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "w" / "records").glob("*.json")]
    assert record["revisions_before"] == [head] and record["revisions_after"] == ["8022782f9ca0"]
    # The probe changed nothing on an empty database: no version table is created just by reading.
    fresh = settings_for(database_url, tmp_path, ini)
    migrate.downgrade(fresh, "base")
    query(database_url, "DROP TABLE app_meta.schema_migrations")
    empty = opslib_cli(database_url, ini, tmp_path / "third", "status", "--json")
    assert json.loads(empty.stdout)["current"] == [] and len(json.loads(empty.stdout)["pending"]) == 5
    assert query(database_url, "SELECT to_regclass('app_meta.schema_migrations') IS NULL")[0][0]


def test_sql_stops_at_a_base_revision_that_inspects_the_schema(database_url, project, tmp_path):
    ini = project("inspects_base")
    base = "2548995c4ab2"
    refused = opslib_cli(database_url, ini, tmp_path, "sql", "base:head")
    assert refused.returncode == 3 and refused.stdout == ""
    (line,) = refused.stderr.splitlines()
    assert f"revision {base} (baseline: tables that predate alembic) cannot be rendered offline" in line
    assert "NoInspectionAvailable" in line and "no revision of the range was fully rendered" in line
    partial = opslib_cli(database_url, ini, tmp_path, "sql", "base:head", "--partial")
    assert partial.returncode == 0, partial.stderr
    assert partial.stdout.startswith(f"-- opslib: PARTIAL SCRIPT: revision {base} is incomplete")
    assert "is NOT in this script" in partial.stdout
    # The rest renders whole, and runs whole in psql on a database at its start revision.
    migrate.upgrade(settings_for(database_url, tmp_path, ini), base)
    rest = opslib_cli(database_url, ini, tmp_path, "sql", f"{base}:head")
    assert rest.returncode == 0, rest.stderr
    from opslib import pgtools

    ran = subprocess.run(
        [pgtools.find_all("psql")[0].path, "-X", "-q", "-v", "ON_ERROR_STOP=1", libpq(database_url)],
        input=rest.stdout, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    # Online, the revision inspects the live schema and the chain deploys from empty.
    deploy = opslib_cli(database_url, ini, tmp_path / "d", "run", "deploy", "-p", "backup", "false")
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr


@pytest.mark.connections
def test_the_target_is_the_database_the_project_names(database_url, project, tmp_path):
    """DATABASE_URL unset: the project's alembic.ini sqlalchemy.url (not the embedded server); set but
    empty: exit 2, nothing started or changed."""
    ini = project("branchy")
    text = ini.read_text()
    assert "sqlalchemy.url = driver://user:pass@localhost/dbname" in text  # the template's placeholder
    ini.write_text(text.replace("driver://user:pass@localhost/dbname", database_url.replace("%", "%%")))
    up = _cli(ini, tmp_path / "w", "upgrade", B3, env={})
    assert up.returncode == 0, up.stdout + up.stderr
    assert query(database_url, "SELECT version_num FROM alembic_version") == [(B3,)]
    assert not (tmp_path / "w" / ".opslib" / "pgdata").exists()  # no embedded server was started

    before = schema_snapshot(database_url)
    empty = _cli(ini, tmp_path / "w", "upgrade", env={"DATABASE_URL": ""})
    assert empty.returncode == 2 and empty.stdout == ""
    (line,) = empty.stderr.splitlines()
    assert "DATABASE_URL is set but empty" in line
    run = _cli(ini, tmp_path / "w", "run", "deploy", env={"DATABASE_URL": ""})
    assert run.returncode == 2, run.stdout + run.stderr
    assert schema_snapshot(database_url) == before


@pytest.mark.connections
def test_an_env_py_that_connects_elsewhere_is_refused_and_nothing_changes(make_database, project, tmp_path):
    ini = project("own_url")
    target, elsewhere = make_database(), make_database()
    url = {"DATABASE_URL": target, "APP_DB_URL": elsewhere}
    for args, code in ((("upgrade",), 2), (("run", "deploy"), 2), (("check",), 2)):
        done = _cli(ini, tmp_path / "w", *args, env=url)
        assert done.returncode == code, args + (done.stdout, done.stderr)
        last = done.stderr.strip().splitlines()[-1]
        assert "env.py connects to" in last and "not to opslib's target" in last, last
        assert make_url(target).database in last and make_url(elsewhere).database in last
        assert "set DATABASE_URL" in last
    for db_url in (target, elsewhere):  # no table, no version row: nothing ran on either
        assert schema_snapshot(db_url)[0] == [] and query(db_url, "SELECT to_regclass('alembic_version')") == [(None,)]
    assert query(elsewhere, "SELECT to_regnamespace('opslib')")[0][0] is None  # opslib never wrote there


@pytest.mark.connections
def test_a_plain_postgresql_url_in_env_py_and_an_asyncpg_target_work(make_database, project, tmp_path):
    """env.py's own plain postgresql:// URL (psycopg 3 under SQLAlchemy 2.1) to the same database works."""
    ini = project("own_url")
    target = make_database()
    plain = libpq(target)
    assert plain.startswith("postgresql://")
    done = _cli(ini, tmp_path / "w", "run", "deploy", "-p", "backup", "false", env={"DATABASE_URL": target, "APP_DB_URL": plain})
    assert done.returncode == 0, done.stdout + done.stderr
    assert query(target, "SELECT version_num FROM alembic_version") == [("8db933fdd363",)]


@pytest.mark.connections
def test_an_asyncpg_database_url_is_accepted(async_project, make_database, tmp_path):  # noqa: F811 - the fixture
    target = make_database()
    asyncpg = libpq(target).replace("postgresql://", "postgresql+asyncpg://", 1)
    done = _cli(async_project, tmp_path / "w", "upgrade", env={"DATABASE_URL": asyncpg})
    assert done.returncode == 0, done.stdout + done.stderr
    assert query(target, "SELECT version_num FROM alembic_version") == [("n001",)]
    status = _cli(async_project, tmp_path / "w", "status", "--json", env={"DATABASE_URL": asyncpg})
    assert json.loads(status.stdout)["current"] == ["n001"]

