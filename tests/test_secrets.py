"""No password anywhere: an env.py whose error shows the URL, with a password that needs percent-encoding.

The password appears in the URL as ``%40`` and ``%2F``; an env.py may print the URL as it got it
(encoded) or a driver may show it decoded. Neither form may reach stderr, the sidecar, the
executed notebook, the ledger, the backups folder or the audit report.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import quote

import pytest

from .conftest import ROOT, opslib_cli

pytestmark = pytest.mark.connections  # make test runs these on the embedded server too

SECRET = "Env-py@Leak/9x"
ENCODED = quote(SECRET, safe="")


def _leaky_project(tmp_path: Path) -> Path:
    """The sample project with an env.py that, when online, fails with a message holding the URL."""
    dest = tmp_path / "leaky"
    shutil.copytree(ROOT / "migrations", dest / "migrations", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "alembic.ini", dest / "alembic.ini")
    env_py = dest / "migrations" / "env.py"
    text = env_py.read_text()
    leak = (
        "if not context.is_offline_mode():\n"
        "    from urllib.parse import unquote\n\n"
        "    raise RuntimeError(f'cannot migrate {_database_url()} (decoded: {unquote(_database_url())})')\n\n\n"
    )
    env_py.write_text(text.replace("if context.is_offline_mode():\n    run_migrations_offline()", leak + "if context.is_offline_mode():\n    run_migrations_offline()"))
    return dest / "alembic.ini"


def _everything_written(folder: Path) -> str:
    return "\n".join(
        p.read_bytes().decode("utf-8", "replace") for p in folder.rglob("*") if p.is_file()
    )


def test_a_password_shown_by_env_py_reaches_no_output_and_no_record(database_url, tmp_path):
    scheme, rest = database_url.split("://", 1)
    user, host = rest.split("@", 1)
    url = f"{scheme}://{user.split(':')[0]}:{ENCODED}@{host}"
    ini = _leaky_project(tmp_path)
    work = tmp_path / "work"

    upgrade = opslib_cli(url, ini, work, "upgrade")
    run = opslib_cli(url, ini, work, "run", "deploy")
    report = opslib_cli(url, ini, work, "audit", "report")
    # The upgrade fails running env.py (exit 1); the deploy's preflight runs env.py online first, and refuses (exit 3).
    for done, code in ((upgrade, 1), (run, 3)):
        assert done.returncode == code, done.stdout + done.stderr
        assert "cannot migrate" in done.stderr and "***" in done.stderr
    assert report.returncode == 0, report.stderr
    written = _everything_written(work)
    assert "cannot migrate" in written  # the error was recorded, only without the password
    for text in (upgrade.stdout + upgrade.stderr, run.stdout + run.stderr, report.stdout, written):
        assert SECRET not in text and ENCODED not in text
        assert ENCODED.lower() not in text.lower()


# The password: characters that need percent-encoding, and a literal "%2F" that a decoder
# would turn into "/". TOKEN is in every form of it (raw, decoded, encoded once or twice).
TOKEN = "x7Kq9"
HARD = f"Zq%2F@:!{TOKEN}"

LEAKY_REVISION = '''"""audit trail"""

import os

from alembic import context, op

revision = "0008"
down_revision = "0007"


def upgrade():
    if context.is_offline_mode():  # it reads data, so it cannot render offline; it says why with the URL
        raise RuntimeError(f"cannot render offline: would need {os.environ['DATABASE_URL']}")
    url = op.get_bind().engine.url
    print("connected to", url.render_as_string(hide_password=False))
    print(f"conninfo: host={url.host} password={url.password} dbname={url.database}")
    print("password alone:", url.password)
    raise RuntimeError(f"audit trail needs a superuser, not {url.render_as_string(hide_password=False)}")


def downgrade():
    pass
'''


def _printing_project(tmp_path: Path) -> Path:
    """The sample project with a revision 0008 that prints its URL and fails, and cannot render offline."""
    dest = tmp_path / "printing"
    shutil.copytree(ROOT / "migrations", dest / "migrations", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "alembic.ini", dest / "alembic.ini")
    (dest / "migrations" / "versions" / "0008_audit_trail.py").write_text(LEAKY_REVISION)
    return dest / "alembic.ini"


def test_a_hard_password_reaches_no_field_file_or_stream_whatever_path_it_takes(database_url, tmp_path):
    """Every path the issue found, with one distinctive password: env.py's error (sidecar ``error``,
    `audit show`), a revision's prints (``migration_output``, `-v` stderr), a check's detail (the record,
    `check --json`, the report page), and a backup's label (the manifest, `backups --json`)."""
    scheme, rest = database_url.split("://", 1)
    user, host = rest.split("@", 1)
    url = f"{scheme}://{user.split(':')[0]}:{quote(HARD, safe='')}@{host}"
    work = tmp_path / "work"
    leaky, printing = _leaky_project(tmp_path), _printing_project(tmp_path)

    streams = []

    def cli(ini: Path, *args: str, code: int | None = None):
        done = opslib_cli(url, ini, work, *args)
        streams.append(done.stdout + done.stderr)
        if code is not None:
            assert done.returncode == code, done.stdout + done.stderr
        return done

    cli(leaky, "run", "deploy", code=3)  # env.py raises with the URL
    cli(printing, "upgrade", "0007", code=0)
    verbose = cli(printing, "-v", "upgrade", "head", code=1)  # 0008 prints the URL, then fails
    assert "connected to" in verbose.stderr and "conninfo: host=" in verbose.stderr
    check = cli(printing, "check", "--json")  # 0008 cannot render offline, and says why with the URL
    assert "cannot render offline" in check.stdout
    cli(printing, "run", "deploy")
    cli(printing, "backup", "--label", url, code=0)
    backups = cli(printing, "backups", "--json", code=0)
    assert '"label"' in backups.stdout
    listing = cli(printing, "audit", "list", "--json", code=0)
    for run_id in {r["run_id"] for r in __import__("json").loads(listing.stdout)}:
        cli(printing, "audit", "show", run_id, code=0)
        cli(printing, "audit", "show", run_id, "--json", code=0)
    cli(printing, "audit", "report", code=0)

    written = _everything_written(work)
    assert "cannot migrate" in written and "connected to" in written and "cannot render offline" in written
    for text in (*streams, written):
        assert TOKEN not in text, text[max(text.find(TOKEN) - 300, 0) : text.find(TOKEN) + 100]
