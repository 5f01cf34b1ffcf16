"""The guide's make targets, run with make as users run them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

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


# --- user-supplied variables never reach the shell as text ------------------------------------------

# Values a user may pass (or an attacker may slip into a CI job's parameters). Each must reach opslib
# as one argument, byte for byte, and none may run anything: every attack here would create PWNED.
HOSTILE = [
    pytest.param("fix users' emails", id="apostrophe"),
    pytest.param("x'; touch PWNED; echo '", id="single-quote-breakout"),
    pytest.param('x"; touch PWNED; echo "', id="double-quote-breakout"),
    pytest.param("add $(touch PWNED) column", id="command-substitution"),
    pytest.param("add $(shell touch PWNED) column", id="make-shell-function"),
    pytest.param("add `touch PWNED` column", id="backticks"),
    pytest.param("add $HOME and ${HOME} and $$ column", id="dollar-variables"),
    pytest.param("add users table\ntouch PWNED\n'", id="newlines"),
    pytest.param(
        "add  two   spaces * ; && touch PWNED | tee PWNED > PWNED # comment", id="spaces-and-operators"
    ),
]

# target, variable, extra arguments, the arguments opslib must receive for the value V.
PROD = ["--env", "production", "-p", "confirm"]
TARGETS = [
    ("migrate-create", "message", [], lambda v: ["revision", "--autogenerate", "-m", v]),
    ("migrate-create-manual", "message", [], lambda v: ["revision", "-m", v]),
    ("migrate-down-to", "revision", [], lambda v: ["downgrade", v]),
    ("migrate-show", "revision", [], lambda v: ["show", v]),
    ("backup-db", "label", [], lambda v: ["backup", "--label", v]),
    ("pre-deploy-check", "revision", [], lambda v: ["check", "--target", v]),
    ("deploy-prod", "confirm", [], lambda v: ["run", "deploy", *PROD, v]),
    ("deploy-prod", "revision", ["confirm=shop"], lambda v: ["run", "deploy", *PROD, "shop", "-p", "target_revision", v]),
    ("rollback-prod", "confirm", [], lambda v: ["run", "rollback", *PROD, v]),
    ("rollback-prod", "revision", ["confirm=shop"], lambda v: ["run", "rollback", *PROD, "shop", "-p", "target_revision", v]),
    ("db-reset", "confirm", [], lambda v: ["run", "reset", "-p", "confirm", v]),
    ("seed-demo", "rows", [], lambda v: ["seed-demo", "--rows", v]),
    ("seed-demo", "seed", [], lambda v: ["seed-demo", "--seed", v]),
    ("rehearse", "revision", [], lambda v: ["rehearse", "-p", "target_revision", v]),
    # -o browser: the Chromium check is not what is tested here (and would install it as root).
    ("audit-report", "out", ["-o", "browser"], lambda v: ["audit", "report", "--screenshot", "--out", v]),
]  # fmt: skip


def _box(folder: Path) -> Path:
    """``folder``/box, where make finds the repository's Makefile and its fresh venv (so installs nothing)."""
    box = folder / "box"
    box.mkdir()
    for name in ("Makefile", "pyproject.toml", ".venv"):
        (box / name).symlink_to(ROOT / name)
    return box


@pytest.fixture
def sandbox(tmp_path):
    """A folder that runs the repository's Makefile with a stand-in for opslib that records its arguments.

    make runs there (the recipes' shell too), so anything an injected command writes lands in it.
    Returns ``run(*make_args, env=None) -> (CompletedProcess, argv or None)``.
    """
    box = _box(tmp_path)
    fake = tmp_path / "fake-opslib"
    argv_file = tmp_path / "argv"
    fake.write_text('#!/bin/sh\nprintf \'%s\\0\' "$@" > "$FAKE_OPSLIB_ARGV"\n')
    fake.chmod(0o755)

    def run(*args: str, env: dict | None = None):
        argv_file.unlink(missing_ok=True)
        full = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL", "MAKE"))}
        full.update(FAKE_OPSLIB_ARGV=str(argv_file), **(env or {}))
        done = subprocess.run(
            ["make", "-s", "-C", str(box), f"OPSLIB={fake}", *args],
            env=full, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        argv = argv_file.read_bytes().decode().split("\0")[:-1] if argv_file.exists() else None
        return done, argv

    run.box = box
    yield run
    assert _pwned(tmp_path) == []


def _pwned(*folders: Path) -> list[Path]:
    found = [p for folder in folders for p in folder.rglob("PWNED")]
    return found + [p for p in (ROOT / "PWNED", Path.cwd() / "PWNED") if p.exists()]


@pytest.mark.parametrize("value", HOSTILE)
def test_every_user_variable_reaches_opslib_intact_and_runs_nothing(sandbox, value):
    for target, var, extra, expected in TARGETS:
        done, argv = sandbox(target, *extra, f"{var}={value}")
        assert done.returncode == 0, (target, var, done.stderr)
        assert argv == expected(value), (target, var)
        assert _pwned(sandbox.box) == [], (target, var)


def test_a_hostile_value_from_the_environment_is_not_expanded_either(sandbox):
    value = "$(shell touch PWNED) `touch PWNED` $(touch PWNED)"
    done, argv = sandbox("backup-db", env={"label": value})
    assert done.returncode == 0, done.stderr
    assert argv == ["backup", "--label", value]


@pytest.mark.parametrize("target, var", [(t, v) for t, v, *_ in TARGETS if t.startswith("migrate-")])
@pytest.mark.parametrize("given", [None, "", "   "], ids=["unset", "empty", "blank"])
def test_a_missing_required_variable_is_one_line_and_exit_2(sandbox, target, var, given):
    done, argv = sandbox(target, *([f"{var}={given}"] if given is not None else []))
    assert done.returncode == 2 and argv is None  # opslib was not called
    (line,) = done.stderr.strip().splitlines()
    assert f"make {target}: give {var}=..., e.g. make {target} {var}=" in line


@pytest.mark.parametrize(
    "target, var, argv",
    [
        ("backup-db", "label", ["backup"]),
        ("pre-deploy-check", "revision", ["check"]),
        ("db-reset", "confirm", ["run", "reset"]),
        ("seed-demo", "rows", ["seed-demo"]),
        ("rehearse", "revision", ["rehearse"]),
    ],
)
def test_optional_variables_left_out_or_blank_add_no_argument(sandbox, target, var, argv):
    for args in ([], [f"{var}="], [f"{var}=  "]):
        done, got = sandbox(target, *args)
        assert done.returncode == 0 and got == argv, (args, done.stderr)


def test_migrate_create_manual_writes_the_message_as_given(tmp_path):
    """The real opslib on a copy of the project: the revision file carries the message, quotes and all."""
    shutil.copytree(
        ROOT / "migrations", tmp_path / "migrations", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "alembic.ini", tmp_path / "alembic.ini")
    box = _box(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL", "MAKE"))}
    # Creating an empty revision reads no database: a URL nothing listens on proves it.
    env.update(
        OPSLIB_ALEMBIC_INI=str(tmp_path / "alembic.ini"), DATABASE_URL="postgresql://nobody@127.0.0.1:9/none"
    )
    versions = tmp_path / "migrations" / "versions"
    before = sorted(p.name for p in versions.glob("*.py"))
    for message in (
        "fix users' emails",
        "x'; touch PWNED; echo '",
        'add $(touch PWNED) `touch PWNED` $(shell touch PWNED) $HOME; > PWNED\nsecond "line"',
    ):
        done = subprocess.run(
            ["make", "-s", "-C", str(box), "migrate-create-manual", f"message={message}"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        path = Path(re.search(r"created revision \w+: (\S+)", done.stdout).group(1))
        assert path.parent == versions
        assert path.read_text().startswith(f'"""{message}\n\nRevision ID: ')
        path.unlink()  # the next message gets the same parent, a single head
        assert _pwned(tmp_path) == []
    assert sorted(p.name for p in versions.glob("*.py")) == before
