"""The guide's make targets, run with make as users run them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from .conftest import ROOT, query, schema_snapshot


def make(*args: str, env: dict) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL", "MAKE"))}
    full.update(env)
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), *args], env=full, capture_output=True, text=True, timeout=300
    )


def test_guide_targets_walk_the_chain(database_url):
    env = {"DATABASE_URL": database_url}
    up = make("migrate-up", env=env)
    assert up.returncode == 0, up.stderr
    assert "after : 0007" in up.stdout
    down = make("migrate-down", env=env)
    assert down.returncode == 0 and "rolled back 0007" in down.stdout
    down_to = make("migrate-down-to", "revision=0003", env=env)
    assert down_to.returncode == 0 and "after : 0003" in down_to.stdout
    status = make("migrate-status", env=env)
    assert "current  : 0003" in status.stdout and "<base> -> 0001" in status.stdout
    show = make("migrate-show", "revision=0003", env=env)
    assert "Revision: 0003" in show.stdout and "idx" not in show.stderr


def test_targets_without_their_argument_say_so_and_change_nothing(database_url):
    env = {"DATABASE_URL": database_url}
    assert make("migrate-up", env=env).returncode == 0
    before = schema_snapshot(database_url)
    for target, var in [
        ("migrate-down-to", "revision"),
        ("migrate-show", "revision"),
        ("migrate-create", "message"),
        ("migrate-create-manual", "message"),
    ]:
        done = make(target, env=env)
        assert done.returncode == 2
        assert f"make {target}: give {var}=..." in done.stderr
    assert schema_snapshot(database_url) == before


def test_add_a_field_workflow_from_the_guide(database_url, tmp_path):
    """Modify a model, `make migrate-create`, review, `make migrate-up` (on a copy of the project)."""
    shutil.copytree(
        ROOT / "migrations", tmp_path / "migrations", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "alembic.ini", tmp_path / "alembic.ini")
    models = tmp_path / "migrations" / "models.py"
    models.write_text(
        models.read_text().replace(
            "    profile_image: Mapped[str | None] = mapped_column(String, nullable=True)\n",
            "    profile_image: Mapped[str | None] = mapped_column(String, nullable=True)\n"
            "    nickname: Mapped[str | None] = mapped_column(String(50), nullable=True)\n",
        )
    )
    env = {"DATABASE_URL": database_url, "OPSLIB_ALEMBIC_INI": str(tmp_path / "alembic.ini")}
    assert make("migrate-up", env=env).returncode == 0
    created = make("migrate-create", "message=add_nickname_to_users", env=env)
    assert created.returncode == 0, created.stderr
    path = re.search(r"created revision \w+: (\S+)", created.stdout).group(1)
    text = open(path).read()
    assert "op.add_column('users', sa.Column('nickname', sa.String(length=50), nullable=True))" in text
    assert "op.drop_column('users', 'nickname')" in text
    assert make("migrate-up", env=env).returncode == 0
    assert query(
        database_url,
        "SELECT count(*) FROM information_schema.columns WHERE table_name='users' AND column_name='nickname'",
    ) == [(1,)]
    manual = make("migrate-create-manual", "message=add_custom_indexes", env=env)
    assert manual.returncode == 0 and "add_custom_indexes" in manual.stdout
