"""The built wheel, installed (not editable) into a fresh virtualenv, runs the runbooks it ships in a
project made with `alembic init`: `opslib runbooks`, `opslib run deploy --help`, `opslib run deploy`, and
`opslib open` (JupyterLab on a run's notebook, sealed when saved)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from .conftest import ROOT

# One worker builds the wheel for both tests: two builds at once in one source tree collide in its build/.
pytestmark = pytest.mark.xdist_group("wheel")

REVISION = '''"""create notes"""
import sqlalchemy as sa
from alembic import op

revision = "w001"
down_revision = None


def upgrade():
    op.create_table("notes", sa.Column("id", sa.Integer, primary_key=True))


def downgrade():
    op.drop_table("notes")
'''


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtualenv with the wheel installed; its dependencies are this environment's, linked by a
    .pth file (which, unlike an editable install's, brings no opslib)."""
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work / "dist"), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run(
        [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip())  # fmt: skip
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # The programs dependencies install beside the interpreter (squawk-cli's squawk), as pip would put them.
    (venv / "bin" / "squawk").symlink_to(Path(sys.executable).parent / "squawk")
    [wheel] = (work / "dist").glob("opslib-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", "-q", str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    return venv


def _alembic_init_project(installed: Path, database_url: str, folder: Path) -> dict:
    """A project made with `alembic init`, one revision in it; the environment to run the wheel's opslib there."""
    alembic = str(Path(sys.executable).parent / "alembic")
    subprocess.run([alembic, "init", "migrations"], cwd=folder, check=True, capture_output=True)
    (folder / "migrations" / "versions" / "w001_create_notes.py").write_text(REVISION)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL", "VIRTUAL_ENV"))}
    env.update(DATABASE_URL=database_url, PATH=f"{installed / 'bin'}:{env['PATH']}")
    return env


def test_the_wheel_runs_its_runbooks_in_an_alembic_init_project(installed, database_url, tmp_path):
    env = _alembic_init_project(installed, database_url, tmp_path)
    opslib = str(installed / "bin" / "opslib")

    where = subprocess.run(
        [installed / "bin" / "python", "-c", "import opslib; print(opslib.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert where.stdout.startswith(str(installed)), where.stdout  # the wheel's opslib, not this checkout's

    listed = subprocess.run([opslib, "runbooks"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    shipped = Path(where.stdout.strip()).parent / "runbooks"
    for name in ("deploy", "rollback", "recovery", "reset"):
        assert f"({shipped / name}.ipynb)" in listed.stdout, listed.stdout
    helped = subprocess.run([opslib, "run", "deploy", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert helped.returncode == 0 and "target_revision: str = 'head'" in helped.stdout, helped.stderr

    done = subprocess.run([opslib, "run", "deploy"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "deploy succeeded (exit 0)" in done.stdout and "now at w001" in done.stdout
    [entry] = [e for e in map(json.loads, (tmp_path / "records" / "ledger.jsonl").read_text().splitlines()) if e.get("kind") != "started"]
    assert entry["outcome"] == "succeeded" and entry["notebook"].endswith(".ipynb")


def test_the_wheel_opens_a_run_in_jupyterlab_and_seals_it_on_save(installed, database_url, tmp_path):
    """`opslib open` from the wheel's environment: JupyterLab on a run of the shipped deploy, saved after its summary."""
    pytest.importorskip("jupyterlab", reason="the `lab` extra (JupyterLab) is not installed")
    from .labdriver import LabSession

    env = _alembic_init_project(installed, database_url, tmp_path)
    lab = LabSession(tmp_path, env, "deploy", opslib=str(installed / "bin" / "opslib"))
    try:
        lab.start_kernel()
        assert lab.kernel_says("import opslib; print(opslib.__file__)").startswith(str(installed))
        nb = lab.read()
        lab.run_cells(nb)
        lab.save(nb)
    finally:
        code = lab.stop()
    assert code == 0, lab.output()
    [entry] = [e for e in map(json.loads, (tmp_path / "records" / "ledger.jsonl").read_text().splitlines()) if e.get("kind") != "started"]
    assert (entry["runbook"], entry["outcome"], entry["revisions_after"]) == ("deploy", "succeeded", ["w001"])
    assert entry["notebook"] == lab.notebook.name
