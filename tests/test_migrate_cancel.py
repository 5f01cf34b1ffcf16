"""Ctrl-C while a long chain's SQL is rendered offline stops at the next revision, not at the chain's end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .conftest import OPSLIB

REVISION = '''"""step {n}"""
import os
import time
from pathlib import Path

from alembic import op

revision = "s{n:03d}"
down_revision = {down}


def upgrade():
    Path(os.environ["MARKS"], revision).touch()
    time.sleep(0.5)  # Python work while rendering, as a revision building its SQL from data files does
    op.execute("SELECT {n}")


def downgrade():
    pass
'''
COUNT = 12


def slow_chain(folder: Path) -> Path:
    """A generic `alembic init` project whose revisions each take half a second to render."""
    alembic = str(Path(sys.executable).parent / "alembic")
    subprocess.run([alembic, "init", "migrations"], cwd=folder, check=True, capture_output=True)
    for n in range(1, COUNT + 1):
        down = "None" if n == 1 else f'"s{n - 1:03d}"'
        (folder / "migrations" / "versions" / f"s{n:03d}_step.py").write_text(REVISION.format(n=n, down=down))
    return folder / "alembic.ini"


def test_ctrl_c_stops_offline_rendering_at_the_next_revision(tmp_path):
    ini = slow_chain(tmp_path)
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update(OPSLIB_ALEMBIC_INI=str(ini), MARKS=str(marks))
    proc = subprocess.Popen(
        [OPSLIB, "sql", "base:head"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not list(marks.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    rendered = sorted(p.name for p in marks.iterdir())
    assert 1 <= len(rendered) <= 2, rendered  # the revision under way ends; no further one begins
