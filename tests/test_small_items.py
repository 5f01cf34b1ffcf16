"""Issue 22, point 7: what the terminal shows of revision messages of several lines and of long check details."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .conftest import FIXTURES, ROOT, opslib_cli, query


def test_a_three_line_message_shows_its_first_line_in_every_listing(database_url, project, tmp_path):
    ini = project("forgetful_downgrade")
    # As an operator writes it: `opslib revision -m $'...'`, Alembic putting the three lines atop the docstring.
    made = opslib_cli(
        database_url, ini, tmp_path, "revision", "-m", "add notes table\nasked for by support\nsee OPS-903"
    )
    assert made.returncode == 0, made.stderr
    rev = made.stdout.split("created revision ")[1].split(":")[0]
    written = next((ini.parent / "versions").glob(f"{rev}_*.py")).read_text()
    assert written.startswith('"""add notes table\nasked for by support\nsee OPS-903\n')

    def shown(*args: str) -> str:
        done = opslib_cli(database_url, ini, tmp_path, *args)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    status = shown("status")
    assert f"{rev}  add notes table" in status.splitlines()
    check = shown("check")
    assert f"{rev} (add notes table)" in check
    upgrade = shown("upgrade", "head")
    assert f"  applied     {rev}  add notes table" in upgrade.splitlines()
    history = shown("history")
    assert f"f003 -> {rev} (head), add notes table" in history.splitlines()
    events = shown("history", "--runs")
    assert any(line.endswith("add notes table") and rev in line for line in events.splitlines())
    for out in (status, check, upgrade, history, events):
        assert "asked for by support" not in out and "OPS-903" not in out, out
    # The whole text stays where a revision is read in full: once each, the message's first line heading it.
    for out in (shown("show", rev), shown("history", "--verbose")):
        assert "Message: add notes table" in out
        assert out.count("asked for by support") == 1 and out.count("see OPS-903") == 1, out


REVISIONS = 40  # each cannot be rendered offline: about 5,000 characters of one check's detail


def _data_reading_chain(folder: Path) -> Path:
    """A chain of revisions that each read rows (`op.get_bind()`), so none renders offline."""
    (folder / "versions").mkdir(parents=True)
    (folder / "alembic.ini").write_text(
        f"[alembic]\nscript_location = {FIXTURES / '_shared'}\nversion_locations = %(here)s/versions\n"
        "path_separator = os\n"
    )
    down = None
    for i in range(1, REVISIONS + 1):
        rev = f"d{i:03d}"
        (folder / "versions" / f"{rev}_backfill_counter_{i}.py").write_text(
            f'"""backfill counter {i} from the rows it counts"""\n\n'
            "import sqlalchemy as sa\nfrom alembic import op\n\n"
            f"revision = {rev!r}\ndown_revision = {down!r}\n\n\n"
            "def upgrade():\n"
            '    op.get_bind().execute(sa.text("SELECT 1")).fetchall()\n'
            f'    op.execute("CREATE TABLE counter_{i} (n int)")\n\n\n'
            "def downgrade():\n"
            f'    op.execute("DROP TABLE counter_{i}")\n'
        )
        down = rev
    return folder / "alembic.ini"


def test_a_long_check_detail_is_wrapped_and_shortened_and_kept_whole_in_the_json(database_url, tmp_path):
    ini = _data_reading_chain(tmp_path / "project")
    done = opslib_cli(database_url, ini, tmp_path, "check")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 200, max(lines, key=len)
    # Wrapped under the detail column, its first findings, how many more, and its last one (what the check did).
    (row,) = [i for i, line in enumerate(lines) if line.startswith("SQL renders offline")]
    column = lines[0].index("detail")
    below = [row + 1]
    while not lines[below[-1]][:column].strip():
        below.append(below[-1] + 1)
    assert len(below) > 3  # continued under its column, not on one line
    text = " ".join(lines[i][column:] for i in [row, *below[:-1]])
    assert "cannot render d001 (" in text and f"… {REVISIONS - 10} more …" in text
    assert "cannot render d020" not in text and "linted without it" in text
    assert "details shortened here" in done.stdout
    # The report itself keeps every word of it.
    whole = json.loads(opslib_cli(database_url, ini, tmp_path, "check", "--json").stdout)
    (offline,) = [c for c in whole["checks"] if c["name"] == "SQL renders offline"]
    assert all(f"cannot render d{i:03d} (" in offline["detail"] for i in range(1, REVISIONS + 1))
    assert len(offline["detail"]) > 4000 and "\n" not in offline["detail"]


def test_a_runbook_notebook_that_names_no_kernel_is_refused_as_configuration(database_url, tmp_path):
    runbooks = tmp_path / "runbooks"
    shutil.copytree(ROOT / "runbooks", runbooks)
    nb = json.loads((runbooks / "deploy.ipynb").read_text())
    del nb["metadata"]["kernelspec"]
    (runbooks / "deploy.ipynb").write_text(json.dumps(nb))
    env = {"OPSLIB_RUNBOOKS_DIR": str(runbooks)}
    done = opslib_cli(database_url, ROOT / "alembic.ini", tmp_path / "w", "run", "deploy", env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("deploy invalid (exit 2): runbook notebook ")
    assert "names no kernel" in done.stderr and "deploy.ipynb" in done.stderr
    assert query(database_url, "SELECT to_regclass('alembic_version') IS NULL") == [(True,)]  # nothing changed
