"""The runbooks end to end: through `opslib run` and plain papermill, their records, refusals, and nbval."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest

from opslib import audit, backup, db, migrate, workflows
from opslib.config import Settings

from .conftest import OPSLIB, ROOT, query, schema_snapshot, settings_for

RUNBOOKS = ["deploy", "rollback", "recovery", "reset"]
# Every runbook shipped, those above and those with tests of their own (test_seed.py, test_rehearse.py).
ALL_RUNBOOKS = [*RUNBOOKS, "init-prod", "rehearse"]
PASSWORD = "Runbook-S3cret-pw-7f3a"
SANITIZE = Path(__file__).resolve().parent / "runbooks.sanitize.cfg"
SIDECAR_KEYS = {
    "run_id", "runbook", "parameters", "operator", "host", "opslib_version", "git_commit", "env", "database",
    "revisions_before", "revisions_after", "backup", "steps", "outcome", "exit_code", "started_at", "finished_at",
}  # fmt: skip


@pytest.fixture
def workdir(tmp_path):
    """A working folder for runs: records and backups land here."""
    return tmp_path / "work"


def opslib_run(url: str, workdir: Path, *args: str, alembic_ini: Path = ROOT / "alembic.ini", extra_env=None):
    """`opslib run …` as an operator runs it, from ``workdir``."""
    workdir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update({"DATABASE_URL": url, "OPSLIB_ALEMBIC_INI": str(alembic_ini)}, **(extra_env or {}))
    return subprocess.run(
        [OPSLIB, "run", *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )


def records(workdir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((workdir / "records").glob("*.json"))]


def ledger(workdir: Path) -> list[dict]:
    """The ledger's endings, one per sealed run (each run's start entry comes before)."""
    return audit.read_endings(workdir / "records")


def assert_complete(record: dict, runbook: str, outcome: str, exit_code: int, mode: str = "headless") -> None:
    assert SIDECAR_KEYS <= record.keys()
    assert (record["runbook"], record["outcome"], record["exit_code"]) == (runbook, outcome, exit_code)
    # Driven by `opslib run` from the template as committed here (this test does not change it); run by
    # papermill alone, opslib does not know which template it was.
    assert record["mode"] == mode
    sha = audit.file_sha256(ROOT / "runbooks" / f"{runbook}.ipynb") if mode == "headless" else None
    assert record["runbook_sha256"] == sha
    assert record["git_dirty"] is None and record["git_commit"] is None  # run from a folder that is no checkout
    assert record["finished_at"] and record["started_at"] <= record["finished_at"]
    for s in record["steps"]:
        assert {"name", "started_at", "duration_s", "outcome"} <= s.keys() and s["outcome"] != "running"


# --- the notebooks themselves ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_RUNBOOKS)
def test_notebook_shape_and_parameters(name):
    path = ROOT / "runbooks" / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    cells = nb.cells
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# ")
    assert "parameters" in cells[1].metadata.get("tags", [])
    inferred = papermill.inspect_notebook(str(path))
    declared = workflows.get(name).parameters
    assert list(inferred) == [p.name for p in declared]
    for p in declared:
        assert inferred[p.name]["inferred_type_name"] == p.type.__name__
        assert inferred[p.name]["default"] == repr(p.default)
        assert inferred[p.name]["help"] == p.help
    # Canonical: as nbformat writes it, with no metadata but the kernel's and the parameters tag, so
    # that a runbook saved from an editor (outputs, widget state, a moved key) shows in review and fails here.
    assert path.read_text() == nbformat.writes(nb) + "\n", f"{path} is not in canonical form: re-save it with nbformat"
    assert set(nb.metadata) <= {"kernelspec", "language_info"}
    assert all(set(c.metadata) <= {"tags"} for c in cells)
    body = cells[2:]
    assert [c.cell_type for c in body] == ["markdown", "code"] * (len(body) // 2)
    for c in body:
        if c.cell_type == "code":
            assert not c.outputs and c.execution_count is None
            assert not re.search(r"\b(for|while|try|except|SELECT|INSERT|UPDATE|DELETE)\b", c.source)
            assert "run." in c.source or "runbook.start" in c.source
        else:
            for word in ("**What:**", "**If it fails:**"):
                assert word in c.source


def test_opslib_runbooks_lists_each_with_its_parameters():
    done = subprocess.run([OPSLIB, "runbooks"], capture_output=True, text=True, check=True)
    for name in ALL_RUNBOOKS:
        assert f"{name}: " in done.stdout
    assert "target_revision: str = 'head'" in done.stdout


# --- end to end through opslib run -------------------------------------------------------------------


def test_the_guide_workflows_through_opslib_run(database_url, workdir):
    done = opslib_run(database_url, workdir, "deploy")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "deploy succeeded (exit 0)" in done.stdout and "now at 0007" in done.stdout + done.stderr
    (deploy,) = records(workdir)
    assert_complete(deploy, "deploy", "succeeded", 0)
    assert deploy["revisions_before"] == [] and deploy["revisions_after"] == ["0007"]
    assert Path(deploy["backup"]["path"]).is_file() and len(deploy["backup"]["sha256"]) == 64
    names = [s["name"] for s in deploy["steps"]]
    assert names[:4] == ["parameters", "preflight", "backup", "upgrade"]
    assert [n for n in names if n.startswith("upgrade ")] == [f"upgrade 000{i}" for i in range(1, 8)]
    assert (workdir / "records" / deploy["notebook"]).is_file()

    assert opslib_run(database_url, workdir, "rollback").returncode == 0
    assert migrate.status(settings_for(database_url, workdir)).current == ("0006",)
    assert opslib_run(database_url, workdir, "rollback", "-p", "target_revision", "0003").returncode == 0
    assert migrate.status(settings_for(database_url, workdir)).current == ("0003",)

    # Recovery: restore the pre-deploy backup (at base), then replay to head.
    first_backup = deploy["backup"]["path"]
    target = db.parse_url(database_url).database
    done = opslib_run(
        database_url, workdir, "recovery", "-p", "backup_file", first_backup, "-p", "confirm", target
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert migrate.status(settings_for(database_url, workdir)).current == ("0007",)

    done = opslib_run(database_url, workdir, "reset")
    assert done.returncode == 0, done.stdout + done.stderr
    assert query(database_url, "SELECT count(*) FROM users")[0][0] == 2  # reseeded sample data

    runs = ledger(workdir)
    assert [r["runbook"] for r in runs] == ["deploy", "rollback", "rollback", "recovery", "reset"]
    assert all(r["outcome"] == "succeeded" and r["exit_code"] == 0 for r in runs)
    for record in records(workdir):
        assert_complete(record, record["runbook"], "succeeded", 0)
        assert (workdir / "records" / record["notebook"]).is_file()


def test_recovery_stamp_after_a_manual_fix(database_url, project, workdir):
    broken = project("broken_revision")
    assert opslib_run(database_url, workdir, "deploy", alembic_ini=broken).returncode == 1
    query(database_url, "ALTER TABLE accounts ADD COLUMN no_such_column int")  # the manual fix
    query(database_url, "CREATE INDEX idx_accounts_missing ON accounts (no_such_column)")
    query(database_url, "CREATE TABLE half_done (id int)")
    done = opslib_run(
        database_url, workdir, "recovery", "-p", "mode", "stamp", "-p", "stamp_revision", "b003",
        "-p", "reason", "index created by hand, ticket 42", alembic_ini=broken,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    record = records(workdir)[-1]
    assert record["parameters"]["reason"] == "index created by hand, ticket 42"
    assert record["revisions_before"] == ["b002"] and record["revisions_after"] == ["b003"]


# --- end to end through plain papermill --------------------------------------------------------------------


@pytest.mark.parametrize("name, extra", [("deploy", []), ("rollback", ["-p", "steps", "2"]), ("reset", [])])
def test_plain_papermill_runs_the_same_runbooks(database_url, workdir, name, extra):
    workdir.mkdir()
    if name == "rollback":
        migrate.upgrade(settings_for(database_url, workdir))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update(DATABASE_URL=database_url, OPSLIB_ALEMBIC_INI=str(ROOT / "alembic.ini"))
    out = workdir / "out.ipynb"
    papermill_bin = str(Path(sys.executable).parent / "papermill")
    done = subprocess.run(
        [papermill_bin, str(ROOT / "runbooks" / f"{name}.ipynb"), str(out), "--no-progress-bar", *extra],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (record,) = records(workdir)
    assert_complete(record, name, "succeeded", 0, mode="direct")
    assert [line["runbook"] for line in ledger(workdir)] == [name]
    assert audit.verify_ledger(workdir / "records") == []  # the ledger vouches for the sidecar as it ended
    expected = {"deploy": ("0007",), "rollback": ("0005",), "reset": ("0007",)}[name]
    assert migrate.status(settings_for(database_url, workdir)).current == expected


# --- failures ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["broken_revision", "broken_generic"])
def test_broken_revision_in_the_middle(database_url, project, workdir, scenario):
    """Deploy stops at the revision before the broken one, also with a one-transaction env.py."""
    done = opslib_run(database_url, workdir, "deploy", alembic_ini=project(scenario))
    assert done.returncode == 1, done.stdout + done.stderr
    (record,) = records(workdir)
    assert_complete(record, "deploy", "failed", 1)
    assert record["revisions_after"] == ["b002"]
    assert "failed at revision b003" in record["error"] and "no_such_column" in record["error"]
    assert [s["name"] for s in record["steps"] if s["outcome"] == "failed"] == ["upgrade"]
    assert (workdir / "records" / record["notebook"]).is_file()
    executed = nbformat.read(workdir / "records" / record["notebook"], as_version=4)
    errors = [
        o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert errors and errors[0]["ename"] == "MigrationFailed"


def test_on_failure_restore_puts_the_database_back(database_url, project, workdir, server_url):
    done = opslib_run(
        database_url, workdir, "deploy", "-p", "on_failure", "restore", alembic_ini=project("broken_revision")
    )
    assert done.returncode == 1
    (record,) = records(workdir)
    assert "pre-deploy backup was restored" in record["error"]
    assert record["revisions_after"] == []
    assert schema_snapshot(database_url) == [[], [], []]  # back where it started: nothing applied


@pytest.mark.parametrize(
    "args, message",
    [
        (["deploy", "-p", "stepz", "1"], "unknown parameter stepz"),
        (["rollback", "-p", "steps", "many"], "steps must be a whole number"),
        (["deploy", "-p", "on_failure", "explode"], "on_failure must be one of stop, restore"),
        (["deploy", "-p", "database_url_env", "postgresql://u:p@h/d"], "holds a URL with a password"),
        (["deploy", "-p", "database_url_env", "postgresql://h/d"], "names the environment variable"),
        (
            ["deploy", "-p", "database_url_env", "NOT_SET_ANYWHERE"],
            "NOT_SET_ANYWHERE (database_url_env) is not set",
        ),
        (["deploy", "-p", "target_revision", "0003; drop"], "is not a revision id"),
        (["deploy", "-p", "backup", "false", "-p", "on_failure", "restore"], "needs backup=True"),
        (["recovery", "-p", "mode", "stamp"], "needs stamp_revision"),
        (["nosuch"], "no runbook 'nosuch'"),
    ],
)
def test_bad_parameters_exit_2_and_change_nothing(database_url, workdir, args, message):
    migrate.upgrade(settings_for(database_url, workdir), "0003")
    before = schema_snapshot(database_url)
    done = opslib_run(database_url, workdir, *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stdout + done.stderr
    assert schema_snapshot(database_url) == before
    if args[0] != "nosuch":
        (record,) = records(workdir)
        assert_complete(record, args[0], "invalid", 2)
        assert record["database"] is None  # refused before any connection


def test_papermill_number_for_a_revision_is_refused_clearly(database_url, workdir):
    """papermill's -p turns 0003 into the number 3; the runbook says so instead of guessing."""
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update(DATABASE_URL=database_url, OPSLIB_ALEMBIC_INI=str(ROOT / "alembic.ini"))
    papermill_bin = str(Path(sys.executable).parent / "papermill")
    done = subprocess.run(
        [papermill_bin, str(ROOT / "runbooks" / "deploy.ipynb"), str(workdir / "o.ipynb"), "-p", "target_revision", "0003"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    assert "must be a string, got the number 3" in done.stderr and "-r target_revision" in done.stderr
    assert schema_snapshot(database_url) == [[], [], []]
    # opslib run keeps revision ids as strings.
    assert opslib_run(database_url, workdir, "deploy", "-p", "target_revision", "0003").returncode == 0
    assert migrate.status(settings_for(database_url, workdir)).current == ("0003",)


def test_reset_is_refused_in_production_and_destructive_steps_need_confirm(database_url, workdir):
    migrate.upgrade(settings_for(database_url, workdir))
    before = schema_snapshot(database_url)
    done = opslib_run(
        database_url,
        workdir,
        "reset",
        "-p",
        "confirm",
        db.parse_url(database_url).database,
        "--env",
        "production",
    )
    assert done.returncode == 3 and "reset is refused in production" in done.stdout + done.stderr
    for args in (["reset", "--env", "staging"], ["rollback", "--env", "production"], ["recovery"]):
        done = opslib_run(database_url, workdir, *args)
        assert done.returncode == 3 and "needs confirm=" in done.stdout + done.stderr, done.stdout
    done = opslib_run(database_url, workdir, "deploy", "-p", "backup", "false", "--env", "production")
    assert done.returncode == 3 and "backup=False is not allowed in production" in done.stdout + done.stderr
    assert schema_snapshot(database_url) == before
    assert [r["outcome"] for r in ledger(workdir)] == ["refused"] * 5


def test_rollback_refuses_an_irreversible_revision(database_url, workdir, project):
    ini = project("broken_revision")
    (ini.parent / "versions" / "b003_broken_index.py").unlink()
    rev = ini.parent / "versions" / "b002_add_accounts_email.py"
    rev.write_text(rev.read_text().replace('    op.drop_column("accounts", "email")', "    pass"))
    assert opslib_run(database_url, workdir, "deploy", alembic_ini=ini).returncode == 0
    done = opslib_run(database_url, workdir, "rollback", alembic_ini=ini)
    assert done.returncode == 3 and "b002 has no real downgrade" in done.stdout + done.stderr and "recovery" in done.stdout + done.stderr
    assert migrate.status(settings_for(database_url, workdir, ini)).current == ("b002",)
    # Acknowledging another revision is invalid input; acknowledging it lets the rollback through, recorded.
    done = opslib_run(
        database_url, workdir, "rollback", "-p", "acknowledge_irreversible", "b001", alembic_ini=ini
    )
    assert done.returncode == 2 and "names b001, which this rollback does not reverse" in done.stdout + done.stderr
    done = opslib_run(
        database_url, workdir, "rollback", "-p", "acknowledge_irreversible", "b002", alembic_ini=ini
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert migrate.status(settings_for(database_url, workdir, ini)).current == ("b001",)
    assert (
        query(database_url, "SELECT count(*) FROM information_schema.columns WHERE column_name = 'email'")[0][
            0
        ]
        == 1
    )
    record = ledger(workdir)[-1]
    assert record["outcome"] == "succeeded"
    sidecar = json.loads(next((workdir / "records").glob(f"*{record['run_id']}*.json")).read_text())
    assert sidecar["acknowledged_irreversible"] == ["b002"]


# --- secrets ------------------------------------------------------------------------------------------


def test_the_password_reaches_no_record_and_no_output(database_url, workdir):
    url = db.parse_url(database_url).set(password=PASSWORD).render_as_string(hide_password=False)
    env = {"APP_DB": url}
    target = db.parse_url(database_url).database
    outputs = []
    for args in (
        ["deploy", "-p", "database_url_env", "APP_DB"],
        ["rollback", "-p", "database_url_env", "APP_DB"],
        ["recovery", "-p", "database_url_env", "APP_DB", "-p", "confirm", target],
        ["reset", "-p", "database_url_env", "APP_DB"],
        ["deploy", "-p", "database_url_env", "APP_DB", "-p", "target_revision", "nope"],
    ):
        done = opslib_run(url, workdir, *args, extra_env=env)
        outputs.append(done.stdout + done.stderr)
    assert [r["outcome"] for r in ledger(workdir)] == ["succeeded"] * 4 + ["invalid"]
    files = [p for p in (workdir / "records").rglob("*") if p.is_file()] + list(
        (workdir / "backups").glob("*")
    )
    assert len(files) > 10
    for text in outputs + [p.read_text(errors="replace") for p in files if p.suffix != ".dump"]:
        assert PASSWORD not in text


# --- nbval ---------------------------------------------------------------------------------------------


def _bring_to(s: Settings, revision: str) -> None:
    current = migrate.status(s).current
    if revision == "head" or not current or migrate.show(s, revision).revision not in current:
        try:
            migrate.upgrade(s, revision)
        except Exception:
            migrate.downgrade(s, revision)


def _prepare(name: str, url: str, workdir: Path) -> list[str]:
    """Bring the database to the state the runbook starts from (again); returns the `opslib run` arguments."""
    s = settings_for(url, workdir)
    if name == "deploy":
        _bring_to(s, "0003")
        return ["deploy"]
    if name == "rollback":
        _bring_to(s, "head")
        return ["rollback"]
    if name == "recovery":
        if not backup.list_backups(s):
            _bring_to(s, "0005")
            made = backup.backup(s)
            assert backup.verify_backup(s, made.path).ok
        _bring_to(s, "head")
        return ["recovery", "-p", "confirm", db.parse_url(url).database]
    _bring_to(s, "0004")
    return ["reset"]


GOLDENS = Path(__file__).resolve().parent / "goldens"
_TEST_DATABASE = re.compile(r"opslib_test_[0-9a-f]+_[0-9a-f]+")


@pytest.mark.parametrize("name", RUNBOOKS)
def test_each_runbook_shows_what_its_golden_shows(name, database_url, tmp_path):
    """nbval re-runs the committed golden (tests/goldens/<runbook>.ipynb, made by `make goldens` on the same
    scenario) and compares every cell's output, but for what the sanitize file masks (times, ids, file
    names, server versions). A change in what a runbook shows fails here, naming the cell, until the
    goldens are made again on purpose and their diff reviewed.
    """
    work = tmp_path / "work"
    work.mkdir()
    args = _prepare(name, database_url, work)
    golden = GOLDENS / f"{name}.ipynb"
    if os.environ.get("GOLDENS") == "write":  # `make goldens`
        done = opslib_run(database_url, work, *args)
        assert done.returncode == 0, done.stdout + done.stderr
        (record,) = records(work)
        executed = nbformat.read(work / "records" / record["notebook"], as_version=4)
        # papermill's bookkeeping (paths, times per cell) is not what the runbook shows.
        executed.metadata.pop("papermill", None)
        for cell in executed.cells:
            cell.metadata.pop("papermill", None)
            cell.metadata.pop("execution", None)
        GOLDENS.mkdir(exist_ok=True)
        golden.write_text(nbformat.writes(executed) + "\n")
        return
    # The golden was made on another throwaway database: its parameters (confirm=…) name this one now.
    nb = nbformat.read(golden, as_version=4)
    here = db.parse_url(database_url).database
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.source = _TEST_DATABASE.sub(here, cell.source)
    copy = work / f"{name}.ipynb"
    copy.write_text(nbformat.writes(nb))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update(DATABASE_URL=database_url, OPSLIB_ALEMBIC_INI=str(ROOT / "alembic.ini"))
    # nbval's kernel starts in the notebook's folder: name the folders, as `make lab` does.
    env.update(OPSLIB_RECORDS_DIR=str(work / "records"), OPSLIB_BACKUPS_DIR=str(work / "backups"))
    check = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval", str(copy), "--nbval-sanitize-with", str(SANITIZE),
         "-p", "no:cacheprovider", "-p", "no:xdist", "-o", "addopts=", "-q", "--rootdir", str(tmp_path)],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout[-4000:]
    assert re.search(r"\d+ passed", check.stdout)
    assert len(records(work)) == 1  # the golden's own run is elsewhere: this is the nbval run's record
