"""A project made by `alembic init -t async` (asyncpg, asyncio.run in env.py), its env.py untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import OPSLIB, query

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


def _opslib(url: str, ini: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update(DATABASE_URL=url, OPSLIB_ALEMBIC_INI=str(ini))
    cwd.mkdir(exist_ok=True)
    return subprocess.run([OPSLIB, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_an_async_project_upgrades_and_deploys_unchanged(async_project, make_database, tmp_path):
    env_py = (async_project.parent / "migrations" / "env.py").read_text()
    assert "asyncio.run(" in env_py and "async_engine_from_config" in env_py

    first = make_database()
    up = _opslib(first, async_project, tmp_path / "cli", "upgrade")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "after : n001" in up.stdout
    assert query(first, "SELECT revision FROM opslib.revision_events") == [("n001",)]

    second = make_database()
    deploy = _opslib(second, async_project, tmp_path / "run", "run", "deploy")
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "run" / "records").glob("*.json")]
    assert record["revisions_after"] == ["n001"]
    assert [s["name"] for s in record["steps"] if s["name"].startswith("upgrade ")] == ["upgrade n001"]
    assert query(second, "SELECT to_regclass('public.notes') IS NOT NULL")[0][0]
    assert (async_project.parent / "migrations" / "env.py").read_text() == env_py  # untouched
