"""A project made by `alembic init -t async` (asyncpg, asyncio.run in env.py), its env.py untouched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import opslib_cli, query

REVISION = '''"""create notes table"""

import sqlalchemy as sa
from alembic import op

revision = "n001"
down_revision = None


def upgrade():
    op.create_table("notes", sa.Column("id", sa.Integer, primary_key=True), sa.Column("body", sa.Text))


def downgrade():
    op.drop_table("notes")
'''


@pytest.fixture
def async_project(tmp_path) -> Path:
    """A fresh `alembic init -t async` project whose sqlalchemy.url names asyncpg, with one revision."""
    alembic = str(Path(sys.executable).parent / "alembic")
    subprocess.run(
        [alembic, "init", "-t", "async", "migrations"], cwd=tmp_path, check=True, capture_output=True
    )
    ini = tmp_path / "alembic.ini"
    ini.write_text(
        ini.read_text().replace(
            "sqlalchemy.url = driver://user:pass@localhost/dbname",
            "sqlalchemy.url = postgresql+asyncpg://app@localhost/app",  # what the application uses
        )
    )
    (tmp_path / "migrations" / "versions" / "n001_create_notes.py").write_text(REVISION)
    return ini


def test_an_async_project_upgrades_and_deploys_unchanged(async_project, make_database, tmp_path):
    env_py = (async_project.parent / "migrations" / "env.py").read_text()
    assert "asyncio.run(" in env_py and "async_engine_from_config" in env_py

    first = make_database()
    up = opslib_cli(first, async_project, tmp_path / "cli", "upgrade")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "after : n001" in up.stdout
    assert query(first, "SELECT revision FROM opslib.revision_events") == [("n001",)]

    second = make_database()
    deploy = opslib_cli(second, async_project, tmp_path / "run", "run", "deploy")
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "run" / "records").glob("*.json")]
    assert record["revisions_after"] == ["n001"]
    assert [s["name"] for s in record["steps"] if s["name"].startswith("upgrade ")] == ["upgrade n001"]
    assert query(second, "SELECT to_regclass('public.notes') IS NOT NULL")[0][0]
    assert (async_project.parent / "migrations" / "env.py").read_text() == env_py  # untouched


def test_an_async_projects_migrations_give_up_on_a_held_lock_like_any_other(
    async_project, database_url, tmp_path
):
    """asyncpg does not read PGOPTIONS: opslib sets lock_timeout on the connection env.py configures."""
    import psycopg2

    from .conftest import libpq

    (async_project.parent / "migrations" / "versions" / "n002_add_note_author.py").write_text(
        '"""add author to notes"""\nimport sqlalchemy as sa\nfrom alembic import op\n'
        'revision = "n002"\ndown_revision = "n001"\n\n'
        "def upgrade():\n    op.add_column('notes', sa.Column('author', sa.Text))\n\n"
        "def downgrade():\n    op.drop_column('notes', 'author')\n"
    )
    assert opslib_cli(database_url, async_project, tmp_path / "cli", "upgrade", "n001").returncode == 0
    blocker = psycopg2.connect(libpq(database_url))
    blocker.cursor().execute("BEGIN; LOCK TABLE notes IN ACCESS SHARE MODE")
    try:
        done = opslib_cli(
            database_url, async_project, tmp_path, "upgrade",
            env={"OPSLIB_DDL_LOCK_TIMEOUT": "0.3", "OPSLIB_DDL_RETRIES": "1"},
        )  # fmt: skip
    finally:
        blocker.rollback()
        blocker.close()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "could not get its locks within lock_timeout 0.3 s in 2 attempts" in done.stderr


SEEN_AS = '''"""record the session's name"""

from alembic import op

revision = "n002"
down_revision = "n001"


def upgrade():
    # As the session says, and as pg_stat_activity lists it (where a later run looks for a dead run's sessions).
    op.execute(
        "CREATE TABLE seen_as AS SELECT current_setting('application_name') AS name, "
        "(SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()) AS listed"
    )


def downgrade():
    op.execute("DROP TABLE seen_as")
'''


def test_an_async_projects_sessions_carry_the_runs_name(async_project, database_url, tmp_path):
    """asyncpg does not read PGAPPNAME: opslib names the session itself, so a dead run's sessions can be found."""
    (async_project.parent / "migrations" / "versions" / "n002_seen_as.py").write_text(SEEN_AS)
    name = "opslib deploy run 0badf00d (o'brien's)"  # a quote: sent bound, never spliced into SQL
    up = opslib_cli(database_url, async_project, tmp_path / "cli", "upgrade", env={"PGAPPNAME": name})
    assert up.returncode == 0, up.stdout + up.stderr
    assert query(database_url, "SELECT name, listed FROM seen_as") == [(name, name)]
