"""No password anywhere: an env.py whose error shows the URL, with a password that needs percent-encoding.

The password appears in the URL as ``%40`` and ``%2F``; an env.py may print the URL as it got it
(encoded) or a driver may show it decoded. Neither form may reach stderr, the sidecar, the
executed notebook, the ledger, the backups folder or the audit report.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import quote

from .conftest import ROOT, opslib_cli

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
