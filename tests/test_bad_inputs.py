"""Bad input, table-driven, across the CLI, the runbooks (`opslib run`) and the make targets.

Each case must give one line on stderr (make adds its own "Error" line after it), the contract's
exit code (2 invalid, 3 refused), no traceback, no change to the database, and never the
password, raw or percent-encoded, in the output, the records or the backups folder. The target's
URL carries a password for that purpose (the test server's trust authentication ignores it).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest

from .conftest import ROOT, opslib_cli, query, schema_snapshot, unanswered, with_database

SECRET = "Bad-Input@S3cret/pw"  # percent-encoded in the URL: Bad-Input%40S3cret%2Fpw
ENCODED = quote(SECRET, safe="")


def _with_password(url: str) -> str:
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1) if "@" in rest else ("postgres", rest)
    return f"{scheme}://{user.split(':')[0]}:{ENCODED}@{host}"


def _files(folder: Path) -> dict[str, str]:
    """Every file the run wrote, as text (they are all JSON, notebooks or dumps)."""
    found = {}
    for path in folder.rglob("*"):
        if path.is_file():
            found[str(path.relative_to(folder))] = path.read_bytes().decode("utf-8", "replace")
    return found


def _state(url: str) -> list:
    """What a bad input must not change: the schema, the revision, the rows, opslib's own history."""
    history = query(url, "SELECT to_regclass('opslib.runs') IS NOT NULL")[0][0]
    runs = query(url, "SELECT count(*) FROM opslib.runs")[0][0] if history else None
    return [schema_snapshot(url), query(url, "SELECT count(*) FROM users")[0][0], runs]


@pytest.fixture
def broken_env_project(tmp_path) -> Path:
    """A copy of the sample project whose env.py cannot be imported (a model module that is gone)."""
    import shutil

    dest = tmp_path / "broken_env"
    shutil.copytree(ROOT / "migrations", dest / "migrations", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "alembic.ini", dest / "alembic.ini")
    env_py = dest / "migrations" / "env.py"
    env_py.write_text("from app_models_renamed import Base  # the module was renamed\n" + env_py.read_text())
    return dest / "alembic.ini"


# (id, how, arguments, environment, exit code, what the one line says)
CASES = [
    ("upgrade unknown", "cli", ["upgrade", "zzzz"], {}, 2, "unknown revision 'zzzz'"),
    ("downgrade unknown", "cli", ["downgrade", "zzzz"], {}, 2, "unknown revision 'zzzz'"),
    ("stamp unknown", "cli", ["stamp", "zzzz"], {}, 2, "unknown revision 'zzzz'"),
    ("show unknown", "cli", ["show", "zzzz"], {}, 2, "unknown revision 'zzzz'"),
    ("upgrade backwards", "cli", ["upgrade", "0002"], {}, 2, "is not ahead of the database's revision 0003"),
    ("downgrade forwards", "cli", ["downgrade", "0005"], {}, 2, "is not behind the database's revision 0003"),
    ("downgrade too far", "cli", ["downgrade", "-9"], {}, 3, "only 3 revision(s) applied"),
    ("upgrade too far", "cli", ["upgrade", "+9"], {}, 3, "only 4 revision(s) pending"),
    ("-x without value", "cli", ["upgrade", "-x", "dev_data"], {}, 2, "-x takes KEY=VALUE"),
    ("sql without range", "cli", ["sql", "0003"], {}, 2, "give a revision range FROM:TO"),
    ("blank message", "cli", ["revision", "-m", " "], {}, 2, "a message is required"),
    ("check unknown target", "cli", ["check", "--target", "zzzz"], {}, 2, "unknown revision 'zzzz'"),
    ("check reason alone", "cli", ["check", "--reason", "x"], {}, 2, "--reason goes with --write-baseline"),
    ("baseline without reason", "cli", ["check", "--write-baseline"], {}, 2, "needs a reason"),
    ("audit show without id", "cli", ["audit", "show"], {}, 2, "audit show needs a RUN_ID"),
    ("audit verify with id", "cli", ["audit", "verify", "abc"], {}, 2, "takes no RUN_ID"),
    ("audit option before its action", "cli", ["audit", "--json", "list"], {}, 2, "--json goes after the action"),
    ("audit show unknown id", "cli", ["audit", "show", "nosuch"], {}, 2, "no run with id 'nosuch'"),
    ("audit list --out", "cli", ["audit", "list", "--out", "x"], {}, 2, "--out belongs to `opslib audit report`, not `audit list`"),
    ("prune keep 0", "cli", ["prune-backups", "--keep", "0"], {}, 2, "--keep"),
    ("prune missing dir", "cli", ["prune-backups", "--keep", "1", "--dir", "/nonexistent/b"], {}, 2, "/nonexistent/b"),
    ("backups missing dir", "cli", ["backups", "--dir", "/nonexistent/b"], {}, 2, "/nonexistent/b"),
    ("verify missing file", "cli", ["verify-backup", "/nonexistent/x.dump"], {}, 2, "/nonexistent/x.dump"),
    ("restore missing file", "cli", ["restore", "/nonexistent/x.dump"], {}, 2, "/nonexistent/x.dump"),
    ("restore without file", "cli", ["restore"], {}, 2, "FILE"),
    ("cleanup with file", "cli", ["restore", "--cleanup", "x.dump"], {}, 2, "--cleanup"),
    ("ini missing", "cli", ["status"], {"OPSLIB_ALEMBIC_INI": "/nonexistent/alembic.ini"}, 2, "/nonexistent/alembic.ini"),
    ("ini not an ini", "cli", ["status"], {"OPSLIB_ALEMBIC_INI": "@binary"}, 2, "alembic.ini"),
    ("ini without section", "cli", ["status"], {"OPSLIB_ALEMBIC_INI": "@nosection"}, 2, "alembic"),
    ("env label", "cli", ["status"], {"OPSLIB_ENV": "prod"}, 2, "OPSLIB_ENV must be one of"),
    ("url malformed", "cli", ["status"], {"DATABASE_URL": "postgres//nowhere"}, 2, "DATABASE_URL"),
    ("url not postgres", "cli", ["status"], {"DATABASE_URL": f"mysql://u:{ENCODED}@h/d"}, 2, "DATABASE_URL"),
    ("url unreachable", "cli", ["status"], {"DATABASE_URL": "@port1"}, 2, "cannot connect"),
    ("url unknown database", "cli", ["status"], {"DATABASE_URL": "@nodb"}, 2, "cannot connect"),
    ("lock timeout text", "cli", ["status"], {"OPSLIB_LOCK_TIMEOUT": "abc"}, 2, "OPSLIB_LOCK_TIMEOUT"),
    ("compression 12", "cli", ["backup"], {"OPSLIB_BACKUP_COMPRESSION": "12"}, 2, "OPSLIB_BACKUP_COMPRESSION"),
    ("records folder a file", "cli", ["audit", "list"], {"OPSLIB_RECORDS_DIR": "@file"}, 2, "is a file"),
    ("env.py not importable", "cli", ["upgrade"], {"OPSLIB_ALEMBIC_INI": "@brokenenv"}, 2, "env.py"),
    ("run without a runbook", "cli", ["run"], {}, 2, "run needs a RUNBOOK"),
    ("run help of unknown runbook", "cli", ["run", "nosuch", "--help"], {}, 2, "no runbook 'nosuch'"),
    ("fleet of an unknown runbook", "cli", ["fleet", "nosuch"], {}, 2, "no runbook 'nosuch'"),
    ("run unknown parameter", "run", ["deploy", "-p", "stepz", "1"], {}, 2, "unknown parameter stepz"),
    ("run steps not a number", "run", ["rollback", "-p", "steps", "many"], {}, 2, "must be a whole number"),
    ("run bad choice", "run", ["deploy", "-p", "on_failure", "explode"], {}, 2, "must be one of stop, restore"),
    ("run bad boolean", "run", ["deploy", "-p", "backup", "maybe"], {}, 2, "must be true or false"),
    (
        "run URL with password as parameter",
        "run",
        ["deploy", "-p", "database_url_env", f"postgresql://u:{ENCODED}@h/d"],
        {},
        2,
        "holds a URL with a password",
    ),
    ("run unset url variable", "run", ["deploy", "-p", "database_url_env", "NOT_SET_X"], {}, 2, "NOT_SET_X"),
    ("run unknown target", "run", ["deploy", "-p", "target_revision", "zzzz"], {}, 2, "unknown revision 'zzzz'"),
    ("run rollback unknown", "run", ["rollback", "-p", "target_revision", "zzzz"], {}, 2, "unknown revision 'zzzz'"),
    ("run revision injection", "run", ["deploy", "-p", "target_revision", "0003; drop"], {}, 2, "is not a revision id"),
    ("run unknown runbook", "run", ["nosuch"], {}, 2, "no runbook 'nosuch'"),
    ("run production without confirm", "run", ["deploy", "--env", "production"], {}, 3, "needs confirm="),
    ("run reset in production", "run", ["reset", "--env", "production"], {}, 3, "reset is refused in production"),
    ("run stamp without revision", "run", ["recovery", "-p", "mode", "stamp"], {}, 2, "needs stamp_revision"),
    ("run acknowledge not ids", "run", ["rollback", "-p", "acknowledge_irreversible", "a b"], {}, 2, "is not one"),
    ("run records folder a file", "run", ["deploy"], {"OPSLIB_RECORDS_DIR": "@file"}, 2, "is a file"),
    ("run env.py not importable", "run", ["deploy"], {"OPSLIB_ALEMBIC_INI": "@brokenenv"}, 2, "env.py"),
    ("revision syntax error", "cli", ["upgrade"], {"OPSLIB_ALEMBIC_INI": "@syntax"}, 2, "0005_add_email_new_to_users.py, line"),
    ("run revision syntax error", "run", ["deploy"], {"OPSLIB_ALEMBIC_INI": "@syntax"}, 2, "is not valid Python"),
    ("revision missing module", "cli", ["upgrade"], {"OPSLIB_ALEMBIC_INI": "@missingmod"}, 2, "'shop_helpers_gone'"),
    ("run revision missing module", "run", ["deploy"], {"OPSLIB_ALEMBIC_INI": "@missingmod"}, 2, "'shop_helpers_gone'"),
    ("revision cycle", "cli", ["upgrade"], {"OPSLIB_ALEMBIC_INI": "@cycle"}, 2, "cycle through 0003, 0004"),
    ("check revision cycle", "cli", ["check"], {"OPSLIB_ALEMBIC_INI": "@cycle"}, 2, "cycle through 0003, 0004"),
    ("run revision cycle", "run", ["deploy"], {"OPSLIB_ALEMBIC_INI": "@cycle"}, 2, "cycle through 0003, 0004"),
    ("role without privileges", "cli", ["upgrade"], {"DATABASE_URL": "@nocreate"}, 2, "lacks a privilege"),
    ("run role without privileges", "run", ["deploy", "-p", "backup", "false"], {"DATABASE_URL": "@nocreate"}, 2, "lacks a privilege"),
    ("read-only role", "cli", ["upgrade"], {"DATABASE_URL": "@readonly"}, 2, "read-only transactions"),
    ("run read-only role", "run", ["deploy", "-p", "backup", "false"], {"DATABASE_URL": "@readonly"}, 2, "read-only transactions"),
    ("run records disk full", "run", ["deploy"], {"OPSLIB_RECORDS_DIR": "@full"}, 2, "the database is at 0003"),
    ("message breaks out of docstring", "cli", ["revision", "-m", 'x"""; import os; os.system("touch PWNED"); """'], {}, 2, "triple quotes"),
    ("message ends with a backslash", "cli", ["revision", "-m", "add index\\"], {}, 2, "a backslash"),
    ("message with a control character", "cli", ["revision", "-m", "add\x1b[31m index"], {}, 2, "a control character"),
    ("merge message with triple quotes", "cli", ["merge", "-m", "m'''x"], {}, 2, "triple quotes"),
    ("make message breaks out", "make", ["migrate-create-manual", 'message=x"""; import os; os.system("touch PWNED"); """'], {}, 2, "triple quotes"),
    ("make show without revision", "make", ["migrate-show"], {}, 2, "give revision=..."),
    ("make down-to without revision", "make", ["migrate-down-to"], {}, 2, "give revision=..."),
    ("make show unknown", "make", ["migrate-show", "revision=zzzz"], {}, 2, "unknown revision 'zzzz'"),
    ("make down-to unknown", "make", ["migrate-down-to", "revision=$(touch PWNED)"], {}, 2, "revision"),
]


def _broken_revisions(tmp_path: Path, how: str) -> str:
    """A copy of the sample project with one revision broken as ``how`` says: a syntax error, an import
    of a module that is not installed, or a down_revision that closes a cycle."""
    import shutil

    dest = tmp_path / f"broken_{how}"
    shutil.copytree(ROOT / "migrations", dest / "migrations", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "alembic.ini", dest / "alembic.ini")
    versions = dest / "migrations" / "versions"
    if how == "syntax":
        with open(versions / "0005_add_email_new_to_users.py", "a") as f:
            f.write("\n\ndef broken(:\n    pass\n")
    elif how == "missingmod":
        path = versions / "0004_add_normalized_price_to_products.py"
        path.write_text(path.read_text().replace("from alembic import op\n", "from alembic import op\nimport shop_helpers_gone\n", 1))
    else:
        path = versions / "0003_add_performance_indexes.py"
        lines = [
            'down_revision = "0007"' if line.startswith("down_revision") else line
            for line in path.read_text().splitlines()
        ]
        path.write_text("\n".join(lines) + "\n")
    return str(dest / "alembic.ini")


@pytest.fixture
def role_url(database_url):
    """``role_url(kind)``: the test database's URL as a new login role: ``nocreate`` (no privilege on
    anything the superuser owns) or ``readonly`` (a superuser whose transactions are read-only)."""
    from sqlalchemy.engine import make_url

    made = []

    def make(kind: str) -> str:
        name = f"opslib_{kind}_{os.getpid()}_{len(made)}"
        made.append(name)
        query(database_url, f"CREATE ROLE {name} LOGIN" + (" SUPERUSER" if kind == "readonly" else ""))
        if kind == "readonly":
            query(database_url, f"ALTER ROLE {name} SET default_transaction_read_only = on")
        return make_url(_with_password(database_url)).set(username=name).render_as_string(hide_password=False)

    yield make
    for name in made:
        query(database_url, f"REASSIGN OWNED BY {name} TO CURRENT_USER")
        query(database_url, f"DROP OWNED BY {name}")
        query(database_url, f"DROP ROLE {name}")


@pytest.fixture
def full_folder(tmp_path):
    """A folder on a filesystem with no room left (a 256 KiB tmpfs, filled): mounting needs root, as CI runs."""
    if os.geteuid() != 0:
        pytest.skip("mounting a full filesystem needs root (CI runs the suite as root)")
    mount = tmp_path / "full"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    (mount / "records").mkdir()
    fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:  # no space left: what the run will meet
        pass
    finally:
        os.close(fd)
    yield mount / "records"
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _params(cases):
    """The cases as pytest params; those about reaching the target (URLs, roles) marked ``connections``."""
    reaching = ("url", "role", "read-only")
    return [
        pytest.param(*c[1:], id=c[0], marks=[pytest.mark.connections] if any(w in c[0] for w in reaching) else [])
        for c in cases
    ]


@pytest.mark.parametrize("how, args, env, code, says", _params(CASES))
def test_bad_input_is_one_line_with_its_exit_code_and_changes_nothing(
    how, args, env, code, says, database_url, tmp_path, broken_env_project, request
):
    url = _with_password(database_url)
    work = tmp_path / "work"
    assert opslib_cli(url, ROOT / "alembic.ini", work, "upgrade", "0003").returncode == 0
    before = _state(database_url)
    special = {
        "@binary": lambda: _write(tmp_path / "garbage.ini", b"\x00\xff\xfe not an ini \x00[["),
        "@nosection": lambda: _write(tmp_path / "other.ini", b"[logging]\nlevel = INFO\n"),
        "@file": lambda: _write(tmp_path / "records-file", b"not a folder"),
        "@brokenenv": lambda: str(broken_env_project),
        "@syntax": lambda: _broken_revisions(tmp_path, "syntax"),
        "@missingmod": lambda: _broken_revisions(tmp_path, "missingmod"),
        "@cycle": lambda: _broken_revisions(tmp_path, "cycle"),
        "@nocreate": lambda: request.getfixturevalue("role_url")("nocreate"),
        "@readonly": lambda: request.getfixturevalue("role_url")("readonly"),
        "@full": lambda: str(request.getfixturevalue("full_folder")),
        "@port1": lambda: _with_password(unanswered(database_url)),
        "@nodb": lambda: with_database(url, "opslib_no_such_database"),
    }
    env = {k: (special[v]() if v in special else v) for k, v in env.items()}
    if how == "make":
        full = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL", "MAKE"))}
        full.update(DATABASE_URL=url, **env)
        done = subprocess.run(
            ["make", "-s", "-C", str(ROOT), *args], cwd=work, env=full, capture_output=True, text=True, timeout=300
        )
        lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("make: ***")]
        assert not (ROOT / "PWNED").exists() and not (work / "PWNED").exists()
    else:
        command = ["run", *args] if how == "run" else args
        ini = Path(env.pop("OPSLIB_ALEMBIC_INI", ROOT / "alembic.ini"))
        done = opslib_cli(env.pop("DATABASE_URL", url), ini, work, *command, env=env)
        lines = done.stderr.strip().splitlines()
    output = done.stdout + done.stderr
    assert done.returncode == code, output
    assert len(lines) == 1, done.stderr
    assert says in lines[0], lines[0]
    assert "Traceback" not in output
    assert SECRET not in output and ENCODED not in output
    after = _state(database_url)
    if code == 3 and how == "run" and after[2] == (before[2] or 0) + 1:
        # A refused run is kept in the database's own history (opslib.runs), as every run that reached it.
        assert query(database_url, "SELECT outcome FROM opslib.runs ORDER BY finished_at DESC LIMIT 1") == [
            ("refused",)
        ]
        after[2] = before[2]
    assert after == before
    for name, text in _files(work).items():
        assert SECRET not in text and ENCODED not in text, name
    assert not list(work.glob("backups/*.dump"))  # nothing was backed up for a run that could not start
    if "OPSLIB_RECORDS_DIR" in env:  # a folder that could not take the record holds no partial file
        folder = Path(env["OPSLIB_RECORDS_DIR"])
        assert not [p.name for p in folder.glob(".*") if folder.is_dir()], list(folder.iterdir())


def _write(path: Path, content: bytes) -> str:
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize(
    "args, env, code",
    [
        (["deploy", "--env", "production"], {}, 3),  # no confirm
        (["deploy"], {"OPSLIB_BACKUPS_DIR": "@full"}, 3),  # no room for the backup
        (["deploy", "-p", "stepz", "1"], {}, 2),
        (["rollback", "-p", "target_revision", "zzzz"], {}, 2),
    ],
    ids=["production without confirm", "backups folder full", "unknown parameter", "unknown target"],
)
def test_a_refused_or_invalid_run_leaves_a_database_without_opslib_schema_without_one(
    args, env, code, database_url, tmp_path, request
):
    """A database migrated by bare Alembic has no `opslib` schema; a run that changes nothing (exit 3 or
    2) must not give it one. Its ledger entry is still written, in the records folder."""
    import sys

    alembic = Path(sys.executable).parent / "alembic"
    bare = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    subprocess.run([str(alembic), "-c", str(ROOT / "alembic.ini"), "upgrade", "0003"], env={**bare, "DATABASE_URL": database_url}, check=True, capture_output=True)
    before = [schema_snapshot(database_url), query(database_url, "SELECT nspname FROM pg_namespace ORDER BY 1")]
    if env.get("OPSLIB_BACKUPS_DIR") == "@full":
        env = {"OPSLIB_BACKUPS_DIR": str(request.getfixturevalue("full_folder").parent / "backups")}
        Path(env["OPSLIB_BACKUPS_DIR"]).mkdir()
    work = tmp_path / "work"
    done = opslib_cli(database_url, ROOT / "alembic.ini", work, "run", *args, env=env)
    assert done.returncode == code, done.stdout + done.stderr
    after = [schema_snapshot(database_url), query(database_url, "SELECT nspname FROM pg_namespace ORDER BY 1")]
    assert after == before
    assert ("opslib",) not in after[1]
    ledger = (work / "records" / "ledger.jsonl").read_text().splitlines()
    assert len(ledger) == 2 and '"started"' in ledger[0]  # its start, then its ending
    assert ('"refused"' if code == 3 else '"invalid"') in ledger[1]


def test_a_message_with_quotes_makes_a_revision_that_imports_and_one_the_template_cannot_hold_is_removed(
    database_url, tmp_path
):
    """Quotes and apostrophes are words people write: the revision file imports, its docstring the message.
    A message the project's template turns into invalid Python (a quote at its very end) is refused, and
    the file Alembic wrote is removed, so the chain never holds a file that cannot be imported."""
    import importlib.util
    import shutil

    dest = tmp_path / "project"
    shutil.copytree(ROOT / "migrations", dest / "migrations", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "alembic.ini", dest / "alembic.ini")
    versions = dest / "migrations" / "versions"
    before = sorted(p.name for p in versions.glob("*.py"))
    message = """add users' "nickname" column (see ticket #12)"""
    done = opslib_cli(database_url, dest / "alembic.ini", tmp_path / "work", "revision", "-m", message)
    assert done.returncode == 0, done.stdout + done.stderr
    (made,) = {p.name for p in versions.glob("*.py")} - set(before)
    spec = importlib.util.spec_from_file_location("made_revision", versions / made)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.__doc__.splitlines()[0] == message

    # A template whose first docstring is the message alone, on one line (the rest follows in a second
    # string): valid for a plain message, while one ending with a quote closes it a quote early.
    mako = dest / "migrations" / "script.py.mako"
    text = mako.read_text()
    assert text.startswith('"""${message}\n')
    mako.write_text('"""${message}"""\n"""' + text[len('"""${message}') :])
    plain = opslib_cli(database_url, dest / "alembic.ini", tmp_path / "work", "revision", "-m", "add nickname index")
    assert plain.returncode == 0, plain.stdout + plain.stderr  # the template itself is sound
    listed = sorted(p.name for p in versions.glob("*.py"))
    refused = opslib_cli(database_url, dest / "alembic.ini", tmp_path / "work", "revision", "-m", 'say "hi"')
    assert refused.returncode == 2, refused.stdout + refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "not valid Python" in line and "removed" in line
    assert sorted(p.name for p in versions.glob("*.py")) == listed


def test_a_syntax_error_elsewhere_in_the_project_is_named_and_no_file_of_it_is_removed(database_url, tmp_path):
    """With revision_environment = true Alembic runs env.py while it makes a revision: a syntax error
    there is the project's to fix (exit 2, named), and never a reason to delete env.py."""
    import shutil

    dest = tmp_path / "project"
    shutil.copytree(ROOT / "migrations", dest / "migrations", ignore=shutil.ignore_patterns("__pycache__"))
    ini = dest / "alembic.ini"
    ini.write_text((ROOT / "alembic.ini").read_text().replace("[alembic]\n", "[alembic]\nrevision_environment = true\n", 1))
    env_py = dest / "migrations" / "env.py"
    env_py.write_text(env_py.read_text() + "\n\ndef broken(:\n    pass\n")
    before = sorted(p.name for p in (dest / "migrations").rglob("*.py"))
    done = opslib_cli(database_url, ini, tmp_path / "work", "revision", "-m", "add nickname")
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "env.py" in line and "not valid Python" in line or "cannot be imported" in line, line
    assert env_py.exists() and sorted(p.name for p in (dest / "migrations").rglob("*.py")) == before
