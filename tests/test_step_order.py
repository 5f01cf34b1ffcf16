"""Step order, enforced in every mode: in plain Python (runbook.start, as a script or Lab would call it)
and once through a Jupyter kernel. A step out of order refuses (exit 3), names the step to run first,
and changes nothing; a finished step run again is shown again, not run again (unless it only reads); no parameter or environment lifts this.
"""

from __future__ import annotations

import json

import pytest
from jupyter_client.manager import start_new_kernel

from opslib import audit, runbook
from opslib.errors import StepOutOfOrder

from .conftest import ROOT, database_name, schema_snapshot


@pytest.fixture
def in_process(database_url, tmp_path, monkeypatch):
    """This process set up as a runbook's kernel would be: the target, the project and the folders."""
    for name, value in {
        "DATABASE_URL": database_url,
        "OPSLIB_ALEMBIC_INI": str(ROOT / "alembic.ini"),
        "OPSLIB_RECORDS_DIR": str(tmp_path / "records"),
        "OPSLIB_BACKUPS_DIR": str(tmp_path / "backups"),
        "OPSLIB_ENV": "development",
        "PGAPPNAME": "",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "records"


def sealed(records) -> dict:
    """The one run's sealed record, after checking its ledger entry vouches for it."""
    [entry] = audit.read_endings(records)
    assert audit.verify_ledger(records) == []
    return json.loads((records / entry["sidecar"]).read_text())


def test_upgrade_before_the_backup_is_refused_and_changes_nothing(in_process, database_url):
    before = schema_snapshot(database_url)
    run = runbook.start("deploy", {"backup": True})
    run.preflight()
    with pytest.raises(StepOutOfOrder, match=r"upgrade needs the backup step first \(the cell `run.backup\(\)` in the section “Backup”\)"):
        run.upgrade()
    assert schema_snapshot(database_url) == before
    record = sealed(in_process)
    assert (record["outcome"], record["exit_code"]) == ("refused", 3)
    assert [(s["name"], s["outcome"]) for s in record["steps"]] == [
        ("parameters", "succeeded"), ("preflight", "succeeded"), ("upgrade", "refused")
    ]  # fmt: skip
    assert record["backup"] is None


def test_upgrade_without_a_preflight_is_refused(in_process, database_url):
    """It used to say "skipped: nothing to deploy" and record success while revisions were pending. The hint
    names the first step missing (the preflight), not the one just before (the backup)."""
    before = schema_snapshot(database_url)
    run = runbook.start("deploy", {"backup": False})
    with pytest.raises(StepOutOfOrder, match=r"upgrade needs the preflight step first \(the cell `run.preflight\(\)` in the section “Preflight”\)"):
        run.upgrade()
    assert schema_snapshot(database_url) == before
    assert sealed(in_process)["outcome"] == "refused"


def test_backup_without_a_preflight_is_refused(in_process):
    run = runbook.start("deploy", {})
    with pytest.raises(StepOutOfOrder, match=r"backup needs the preflight step first \(the cell `run.preflight\(\)` in the section “Preflight”\)"):
        run.backup()
    assert not (in_process.parent / "backups").exists() or not list((in_process.parent / "backups").iterdir())


def test_a_finished_step_run_again_is_shown_again_and_the_run_goes_on(in_process, database_url, tmp_path):
    """A cell run twice by accident (the backup, the preflight, even the summary): the step shows its result
    again, is neither run nor recorded again, and the run goes on to succeed. A step that only reads runs again."""
    run = runbook.start("deploy", {"backup": True})
    run.preflight()
    first = run.backup()
    dumps = sorted((tmp_path / "backups").glob("*.dump"))
    again = run.backup()
    assert sorted((tmp_path / "backups").glob("*.dump")) == dumps and len(dumps) == 1  # no second backup
    assert again.title == first.title and again.facts == first.facts
    assert "shown again, not run again" in again.status and "shown again" in repr(again)
    run.preflight()
    run.upgrade()
    run.verify()
    run.verify()  # reads only: run again
    summary = run.summary()
    assert "shown again" in run.summary().status and summary.facts == run.summary().facts
    record = sealed(in_process)
    assert record["outcome"] == "succeeded"
    names = [s["name"] for s in record["steps"] if not s["name"].startswith("upgrade ")]  # one per revision
    assert names == ["parameters", "preflight", "backup", "upgrade", "verify", "verify", "summary"]


def test_the_summary_needs_the_verify_step(in_process):
    run = runbook.start("deploy", {"backup": False})
    run.preflight()
    run.backup()
    run.upgrade()
    with pytest.raises(StepOutOfOrder, match=r"summary needs the verify step first"):
        run.summary()
    record = sealed(in_process)
    assert record["outcome"] == "refused" and record["steps"][-1]["name"] == "summary"
    assert "verify" not in [s["name"] for s in record["steps"]]


@pytest.mark.connections
def test_no_parameter_lifts_the_order_in_production(in_process, database_url, monkeypatch):
    monkeypatch.setenv("OPSLIB_ENV", "production")
    before = schema_snapshot(database_url)
    name = database_name(database_url)
    run = runbook.start("deploy", {"confirm": name, "backup": True, "on_failure": "stop"})
    run.preflight()
    with pytest.raises(StepOutOfOrder):
        run.upgrade()
    assert schema_snapshot(database_url) == before


def test_the_order_holds_in_a_jupyter_kernel(in_process, database_url):
    """The same refusal when the cells are run by a kernel, as in JupyterLab."""
    before = schema_snapshot(database_url)
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        outputs = []
        for code in ('from opslib import runbook\nrun = runbook.start("deploy", {})', "run.preflight()", "run.upgrade()"):
            reply = kc.execute_interactive(code, timeout=120, output_hook=outputs.append)
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "StepOutOfOrder"
        assert "needs the backup step first" in reply["content"]["evalue"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert schema_snapshot(database_url) == before
    assert sealed(in_process)["outcome"] == "refused"


def test_a_template_opened_in_jupyterlab_does_not_run(in_process, monkeypatch):
    """jupyter_server names the notebook of each kernel it starts (JPY_SESSION_NAME): a runbook started from
    the template in runbooks/ refuses before anything is recorded; `opslib open` makes the run's copy."""
    from opslib.errors import InvalidInput

    monkeypatch.setenv("JPY_SESSION_NAME", str(ROOT / "runbooks" / "deploy.ipynb"))
    with pytest.raises(InvalidInput, match=r"deploy.ipynb is a runbook template.*`opslib open deploy`"):
        runbook.start("deploy", {"backup": True})
    assert not in_process.exists() or not list(in_process.glob("*.json"))
