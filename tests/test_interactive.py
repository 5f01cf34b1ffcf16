"""Interactive runs (`opslib open`): the run's own notebook, driven as JupyterLab drives it, sealed on save.

The JupyterLab server here is the one `opslib open` starts, with its save hooks; the notebook's kernel
is the one the server starts for it. tests/labdriver.py drives both through their real interfaces;
test_lab_in_chromium drives JupyterLab's own page in headless Chromium.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
from pathlib import Path

import pytest

pytest.importorskip("jupyterlab", reason="the `lab` extra (JupyterLab) is not installed")

from opslib import audit  # noqa: E402
from opslib import lab as opslib_lab  # noqa: E402
from opslib.autoseal import AUTOSAVE_S  # noqa: E402

from .conftest import OPSLIB, ROOT, opslib_cli, query  # noqa: E402
from .labdriver import LabSession  # noqa: E402

TEMPLATE = ROOT / "runbooks" / "deploy.ipynb"


def _env(database_url: str) -> dict:
    return {"DATABASE_URL": database_url, "OPSLIB_ALEMBIC_INI": str(ROOT / "alembic.ini")}


def _opslib(work: Path, database_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    return subprocess.run(
        [OPSLIB, *args], cwd=work, env={**env, **_env(database_url)}, capture_output=True, text=True, timeout=120
    )


def _ledger(work: Path) -> list[dict]:
    """The ledger's endings (a run's start entry is written when it is opened)."""
    path = work / "records" / "ledger.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [e for e in entries if e.get("kind") != "started"]


def _wait_for(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def _mark(nb) -> str:
    """The text of the run's seal mark in ``nb`` (the last cell's output tagged with the run's id)."""
    marks = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "opslib_seal" in o.get("metadata", {})]
    assert len(marks) == 1, marks
    return "".join(marks[0]["data"]["text/plain"])


def test_a_run_is_sealed_by_the_autosave_after_its_summary_with_no_save_pressed(database_url, tmp_path):
    """Nobody presses Ctrl+S: the summary shows the seal mark and waits in its cell; the run's JupyterLab
    autosaves (the driver saves every AUTOSAVE_S seconds while the notebook changes, as Lab's autosave does);
    that save seals the run, and the summary's last line says so with the ledger entry's hash. Later autosaves
    keep the sealed file as it is; an edit is refused."""
    template_before = audit.file_sha256(TEMPLATE)
    lab = LabSession(tmp_path / "work", _env(database_url), "deploy", "-p", "target_revision", "head")
    try:
        # The run's own notebook, parameters injected as papermill does; its first record is already written.
        nb = lab.read()
        assert any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
        lab.start_kernel()
        # The kernel starts where `opslib open` ran (the project), as `opslib run`'s does, not in records/.
        assert lab.kernel_says("import os; print(os.getcwd())") == str(lab.work)
        lab.run_cells(nb)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, errors
        (entry,) = _ledger(lab.work)
        assert entry["outcome"] == "succeeded" and entry["notebook"] == lab.notebook.name
        assert entry["notebook_sha256"] == audit.file_sha256(lab.notebook)
        assert _mark(nb).endswith(f"succeeded; sealed in the ledger: entry {entry['hash']}")
        assert lab.autosave_errors == []  # the autosaves after the seal were kept as sealed, none refused
        saved = lab.read()
        assert any("Deploy summary" in json.dumps(c.get("outputs", [])) for c in saved.cells)
        assert "succeeded; sealing: JupyterLab saves this notebook" in _mark(saved)  # as it was when it sealed
        lab.save(nb)  # Ctrl+S now: nothing new, the sealed file stays
        assert audit.file_sha256(lab.notebook) == entry["notebook_sha256"]
        nb.cells[-1].source += "\n# an edit"
        with pytest.raises(urllib.error.HTTPError) as refused:
            lab.save(nb)
        assert refused.value.code == 409 and b"sealed" in refused.value.read()
    finally:
        code = lab.stop()
    assert code == 0, lab.output()
    record = json.loads(lab.notebook.with_suffix(".json").read_text())
    assert record["mode"] == "interactive" and record["runbook_sha256"] == template_before
    assert record["sealed_by"].startswith("the JupyterLab save of its notebook")
    assert query(database_url, "SELECT version_num FROM alembic_version") == [("0007",)]
    verified = _opslib(lab.work, database_url, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert audit.file_sha256(TEMPLATE) == template_before
    status = subprocess.run(["git", "status", "--porcelain", "runbooks"], cwd=ROOT, capture_output=True, text=True)
    assert status.stdout == ""


def test_a_session_ended_unsaved_after_the_summary_is_sealed_with_its_own_outcome(database_url, tmp_path):
    """Its kernel ended the run: the ledger, its sidecar and the database's history all say how, although
    the notebook was never saved after the summary (the seal says so, and vouches for it as last saved)."""
    lab = LabSession(tmp_path / "work", _env(database_url))
    try:
        lab.start_kernel()
        nb = lab.read()
        lab.run_cells(nb, until="run.preflight()")
        lab.save(nb)  # a save before the summary seals nothing
        assert not _ledger(lab.work)
        lab.run_cells(nb, after="run.preflight()", until="run.verify()", autosave=False)
        lab.client.execute("run.summary()")  # the summary ends the run, shows its seal mark and waits…
        sidecar = lab.notebook.with_suffix(".json")
        _wait_for(lambda: json.loads(sidecar.read_text()).get("closed_at"))
    finally:
        code = lab.stop()  # …and JupyterLab is closed before anything saved it
    assert code == 0, lab.output()
    (entry,) = _ledger(lab.work)
    assert entry["outcome"] == "succeeded" and "its notebook as last saved" in entry["sealed_by"]
    assert entry["revisions_after"] == ["0007"] and entry["notebook_sha256"] == audit.file_sha256(lab.notebook)
    # The ending is appended to the ledger; the sidecar stays as the kernel left it, and says the same.
    assert json.loads(lab.notebook.with_suffix(".json").read_text())["outcome"] == "succeeded"
    assert query(database_url, "SELECT outcome FROM opslib.runs WHERE run_id = :id", id=entry["run_id"]) == [("succeeded",)]
    shown = _opslib(lab.work, database_url, "audit", "show", entry["run_id"], "--json")
    assert json.loads(shown.stdout)["outcome"] == "succeeded"
    verified = _opslib(lab.work, database_url, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_kernel_killed_after_the_preflight_is_abandoned_at_the_next_audit(database_url, tmp_path):
    lab = LabSession(tmp_path / "work", _env(database_url))
    try:
        lab.start_kernel()
        nb = lab.read()
        lab.run_cells(nb, until="run.preflight()")  # the run holds the database's lock now
        pid = lab.kernel_pid()
        os.kill(pid, signal.SIGKILL)
        # JupyterLab is still open: the run lived as long as its kernel, and is abandoned now.
        listed = _wait_for(
            lambda: (r := _opslib(lab.work, database_url, "audit", "list")).returncode == 0
            and "abandoned" in r.stdout
            and r
        )
        assert "opslib: sealed run" in listed.stderr and "the database is at base" in listed.stderr
        (entry,) = _ledger(lab.work)
        assert entry["outcome"] == "abandoned"
        verified = _opslib(lab.work, database_url, "audit", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        # Its lock went with its kernel: a headless deploy runs now.
        deployed = _opslib(lab.work, database_url, "run", "deploy")
        assert deployed.returncode == 0, deployed.stderr
    finally:
        # JupyterLab restarts the dead kernel; stopped meanwhile it can hang, and is then killed after a grace period.
        code = lab.stop(timeout=opslib_lab.LAB_STOP_GRACE_S + 30)
    assert code == 1, lab.output()  # the run it opened was abandoned


def test_a_restarted_kernel_cannot_start_the_run_again(database_url, tmp_path):
    lab = LabSession(tmp_path / "work", _env(database_url))
    try:
        session = lab.start_kernel()
        nb = lab.read()
        lab.run_cells(nb, until="runbook.start(")
        sidecar = lab.notebook.with_suffix(".json")
        first = sidecar.read_text()
        lab.api("POST", f"/api/kernels/{session['kernel']['id']}/restart")
        lab.reconnect()
        lab.run_cells(nb, until="runbook.start(")
        (error,) = [o for o in nb.cells if o.cell_type == "code" for o in o.outputs if o.output_type == "error"]
        assert error.ename == "PreconditionFailed" and "has already started" in error.evalue
        assert "opslib open deploy" in error.evalue
        assert sidecar.read_text() == first  # the record stays as the first kernel left it
    finally:
        code = lab.stop(timeout=opslib_lab.LAB_STOP_GRACE_S + 30)
    assert code == 1  # the run the first kernel started was never finished: abandoned


def test_audit_seal_seals_a_finished_run_and_refuses_one_in_progress(database_url, tmp_path):
    lab = LabSession(tmp_path / "work", _env(database_url))
    try:
        lab.start_kernel()
        nb = lab.read()
        lab.run_cells(nb, until="run.preflight()")
        run_id = json.loads(lab.notebook.with_suffix(".json").read_text())["run_id"]
        busy = _opslib(lab.work, database_url, "audit", "seal", run_id)
        assert busy.returncode == 3 and "still in progress" in busy.stderr
        lab.run_cells(nb, after="run.preflight()")  # the autosave after the summary seals it
        again = _opslib(lab.work, database_url, "audit", "seal", run_id)
        assert again.returncode == 0 and "already sealed as succeeded" in again.stdout
    finally:
        lab.stop()
    unknown = _opslib(lab.work, database_url, "audit", "seal", "nosuchrun")
    assert unknown.returncode == 2 and "no run nosuchrun" in unknown.stderr
    pattern = _opslib(lab.work, database_url, "audit", "seal", "*")
    assert pattern.returncode == 2 and "is not a run id" in pattern.stderr


def _in_lab_until(page, done, timeout_s: float) -> bool:
    """Wait until ``done()``, answering Lab's kernel dialog as an operator would. On a loaded machine Lab may
    open the notebook before it has the kernel list, and then asks which kernel to start: the notebook's own,
    preselected, is chosen."""
    choose = page.locator(".jp-Dialog button", has_text="Select")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if choose.count() and choose.first.is_visible():
            choose.first.click()
        elif done():
            return True
        page.wait_for_timeout(250)
    return False


def _chromium():
    """Playwright's sync API and Debian's Chromium, or the test is skipped."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium (make browser installs Debian's)")
    return sync_api, chromium


def _run_all_in_chromium(browser, lab: LabSession):
    """JupyterLab's page on the run's notebook, its kernel idle, and Run All Cells chosen from the Run menu."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{lab.url}/lab/tree/{lab.notebook.name}?token={lab.token}")
    page.wait_for_selector(".jp-Notebook", timeout=60_000)
    idle = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")
    for _ in range(2):  # the dialog may come just after the kernel first shows idle
        assert _in_lab_until(page, lambda: idle.count() > 0, 90), "the notebook's kernel never became idle"
        page.wait_for_timeout(2000)
    page.click("text=Run", timeout=30_000)  # the menu bar's Run menu
    page.click("text=Run All Cells")
    return page


def test_a_refused_preflight_in_chromium_shows_its_findings_and_is_sealed_refused(database_url, tmp_path, project):
    """JupyterLab's own page, one notebook open (the run's), Run All Cells on a deploy a finding blocks: the
    preflight shows its findings table and SQL, the run is sealed `refused` with no save pressed, and no
    error dialog comes. The screenshot of that preflight is the one beside the README's JupyterLab section."""
    sync_api, chromium = _chromium()
    ini = project("unsafe_ddl")
    work = tmp_path / "work"
    assert opslib_cli(database_url, ini, work, "upgrade", "u001").returncode == 0
    query(database_url, "INSERT INTO accounts (name) VALUES ('first customer')")
    lab = LabSession(work, {**_env(database_url), "OPSLIB_ALEMBIC_INI": str(ini)})
    shots = Path(os.environ.get("OPSLIB_SCREENSHOTS") or tmp_path)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = _run_all_in_chromium(browser, lab)
            (entry,) = _wait_for(lambda: _ledger(lab.work), timeout=90)
            sealed = page.locator(".jp-OutputArea-output", has_text=f"refused; sealed in the ledger: entry {entry['hash']}")
            assert _in_lab_until(page, lambda: sealed.count() > 0, 30), page.inner_text("body")[-2000:]
            # One run, one Lab: the run's notebook is the only document open.
            assert page.locator(".jp-mod-current .lm-TabBar-tab, #jp-main-dock-panel .lm-TabBar-tab").count() == 1
            assert len(lab.api("GET", "/api/sessions")) == 1
            findings = page.locator(".jp-OutputArea-output", has_text="Findings: 1 blocking").first
            findings.evaluate("element => element.scrollIntoView({block: 'center'})")
            page.wait_for_timeout(500)
            page.screenshot(path=str(shots / "lab-refused-preflight.png"))
            assert page.locator("code", has_text="# opslib-accept: adding-required-field").count() == 1
            page.wait_for_timeout(3 * 1000 * AUTOSAVE_S)
            assert page.locator(".jp-Dialog").count() == 0  # no "File Save Error" from the autosaves
            browser.close()
    finally:
        lab.stop()
    assert entry["outcome"] == "refused" and entry["notebook_sha256"] == audit.file_sha256(lab.notebook)
    runs = query(database_url, "SELECT outcome FROM opslib.runs WHERE run_id = :id", id=entry["run_id"])
    assert runs == [("refused",)]


def test_lab_in_chromium_runs_all_and_seals_with_no_save_pressed(database_url, tmp_path):
    """JupyterLab's own page: open the run's notebook, Run All Cells, and nothing else: the run's Lab autosaves,
    the record is sealed, and the summary's last line says so with the ledger entry's hash."""
    sync_api, chromium = _chromium()
    template_before = audit.file_sha256(TEMPLATE)
    lab = LabSession(tmp_path / "work", _env(database_url))
    shots = Path(os.environ.get("OPSLIB_SCREENSHOTS") or tmp_path)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = _run_all_in_chromium(browser, lab)
            summary = page.locator(".jp-OutputArea-output", has_text="Deploy summary")
            if not _in_lab_until(page, lambda: summary.count() > 0, 180):
                page.screenshot(path=str(shots / "lab-timeout.png"), full_page=True)
                raise AssertionError(
                    f"no summary in Lab (screenshot {shots / 'lab-timeout.png'}): {page.inner_text('body')[-3000:]}"
                    f"\n{lab.output()[-3000:]}"
                ) from None
            preflight = page.locator(".jp-OutputArea-output", has_text="Preflight:").first
            preflight.evaluate("element => element.scrollIntoView({block: 'start'})")
            page.wait_for_timeout(500)  # the notebook renders the cells scrolled into view
            page.screenshot(path=str(shots / "lab-preflight.png"))
            _wait_for(lambda: _ledger(lab.work), timeout=60)  # no key pressed: the autosave sealed it
            (entry,) = _ledger(lab.work)
            sealed = page.locator(".jp-OutputArea-output", has_text=f"sealed in the ledger: entry {entry['hash']}")
            assert _in_lab_until(page, lambda: sealed.count() > 0, 30), page.inner_text("body")[-2000:]
            page.wait_for_timeout(3 * 1000 * AUTOSAVE_S)  # the autosaves after the seal: kept as sealed
            assert page.locator(".jp-Dialog").count() == 0, page.inner_text(".jp-Dialog")  # no "File Save Error"
            browser.close()
    finally:
        lab.stop()
    (entry,) = _ledger(lab.work)
    assert entry["outcome"] == "succeeded" and entry["notebook_sha256"] == audit.file_sha256(lab.notebook)
    assert "Deploy summary" in lab.notebook.read_text()
    verified = _opslib(lab.work, database_url, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert audit.file_sha256(TEMPLATE) == template_before


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("deploy", "-p", "bogus", "1"), "unknown parameter bogus"),
        (("deploy", "-p", "database_url_env", "postgresql://u:hunter2@db/app"), "holds a URL with a password"),
        (("deploy", "-p", "target_revision", "x;y"), "is not a revision id"),
        (("nosuch",), "no runbook 'nosuch'"),
        (("deploy", "--env", "production", "-p", "backup", "false"), "backup=False is not allowed in production"),
        (("reset", "--env", "production"), "reset is refused in production"),
        (("deploy", "--env", "production", "-p", "dev_data", "true"), "dev_data=True is refused in production"),
    ],
)
def test_bad_input_to_open_is_refused_before_anything_exists(database_url, tmp_path, args, says):
    """Bad parameters (exit 2) and the environment's rules (exit 3) are checked as `opslib run` checks them,
    before JupyterLab starts or anything is written."""
    opened = _opslib(tmp_path, database_url, "open", *args)
    code = 3 if "production" in args else 2
    assert opened.returncode == code and says in opened.stderr and len(opened.stderr.splitlines()) == 1, opened.stderr
    assert "hunter2" not in opened.stderr
    assert not (tmp_path / "records").exists() or not list((tmp_path / "records").iterdir())


def test_a_backup_cell_run_twice_shows_its_result_again_and_the_run_goes_on(database_url, tmp_path):
    """The operator runs the backup cell a second time by accident: it shows the backup again, takes none,
    and the run goes on to its upgrade and summary, sealed succeeded."""
    lab = LabSession(tmp_path / "work", _env(database_url))
    try:
        lab.start_kernel()
        nb = lab.read()
        lab.run_cells(nb, until="run.backup()")
        backups = sorted((lab.work / "backups").glob("*.dump"))
        lab.run_cells(nb, until="run.backup()", after="run.preflight()")  # the backup cell, again
        (cell,) = [c for c in nb.cells if "run.backup()" in c.source]
        shown = json.dumps(cell.outputs)
        assert "shown again, not run again" in shown and not [o for o in cell.outputs if o.output_type == "error"]
        assert sorted((lab.work / "backups").glob("*.dump")) == backups  # no second backup
        lab.run_cells(nb, after="run.backup()")
    finally:
        lab.stop()
    (entry,) = _ledger(lab.work)
    assert entry["outcome"] == "succeeded" and [s[0] for s in entry["steps"]].count("backup") == 1
    assert query(database_url, "SELECT version_num FROM alembic_version") == [("0007",)]


def test_a_refused_preflight_shows_its_plan_and_is_sealed_refused_at_once(database_url, tmp_path, project):
    """A blocking finding: the preflight still shows the pending revisions, their SQL and the findings table,
    its error is one line, and the run is sealed `refused` by the autosave, in the ledger and in the database,
    with nobody saving and JupyterLab still open."""
    ini = project("unsafe_ddl")
    work = tmp_path / "work"
    env = {**_env(database_url), "OPSLIB_ALEMBIC_INI": str(ini)}
    assert opslib_cli(database_url, ini, work, "upgrade", "u001").returncode == 0
    query(database_url, "INSERT INTO accounts (name) VALUES ('first customer')")
    lab = LabSession(work, env)
    try:
        lab.start_kernel()
        nb = lab.read()
        lab.run_cells(nb, until="run.preflight()")
        (entry,) = _wait_for(lambda: _ledger(lab.work))  # sealed while Lab is open, nothing pressed
        (cell,) = [c for c in nb.cells if "run.preflight()" in c.source]
        html = "".join(o.get("data", {}).get("text/html", "") for o in cell.outputs)
        assert "Preflight: refused: squawk lint failed, 3 revision(s) not applied" in html
        assert "ALTER TABLE accounts ADD COLUMN balance INTEGER NOT NULL;" in html and "pending u002" in html
        assert "<code># opslib-accept: adding-required-field -- why it is safe here</code>" in html
        (error,) = [o for o in cell.outputs if o.output_type == "error"]
        assert len(error.traceback) == 1 and "effectively makes it required" not in error.traceback[0]
        assert _mark(nb).endswith(f"refused; sealed in the ledger: entry {entry['hash']}")
        assert lab.autosave_errors == []
    finally:
        lab.stop()
    assert entry["outcome"] == "refused" and entry["notebook_sha256"] == audit.file_sha256(lab.notebook)
    runs = query(database_url, "SELECT outcome FROM opslib.runs WHERE run_id = :id", id=entry["run_id"])
    assert runs == [("refused",)]
    assert query(database_url, "SELECT version_num FROM alembic_version") == [("u001",)]


def test_each_run_has_a_lab_of_its_own_and_the_users_settings_are_left_alone(database_url, tmp_path):
    """Two runs, one after the other, in one project: each Lab serves the run's settings (autosave, no news)
    over the user's own (their theme kept), starts with no workspace of an earlier run, and never writes the
    user's settings or workspaces."""
    user = tmp_path / "user"
    settings_dir, workspaces_dir = user / "settings", user / "workspaces"
    theme = settings_dir / "@jupyterlab" / "apputils-extension" / "themes.jupyterlab-settings"
    theme.parent.mkdir(parents=True)
    theme.write_text('{\n  // the user\'s own\n  "theme": "JupyterLab Dark"\n}\n')
    workspaces_dir.mkdir()
    (workspaces_dir / "default-37a8.jupyterlab-workspace").write_text(
        json.dumps({"data": {"layout-restorer:data": {"main": {"current": "notebook:old-run.ipynb"}}},
                    "metadata": {"id": "default"}})  # fmt: skip
    )
    before = {p: audit.file_sha256(p) for p in user.rglob("*") if p.is_file()}
    env = {**_env(database_url), "JUPYTERLAB_SETTINGS_DIR": str(settings_dir), "JUPYTERLAB_WORKSPACES_DIR": str(workspaces_dir)}
    for _ in range(2):
        lab = LabSession(tmp_path / "work", env)
        try:
            docmanager = lab.api("GET", "/lab/api/settings/@jupyterlab/docmanager-extension:plugin")
            assert docmanager["settings"]["autosave"] is True and docmanager["settings"]["autosaveInterval"] == AUTOSAVE_S
            news = lab.api("GET", "/lab/api/settings/@jupyterlab/apputils-extension:notification")["settings"]
            assert news["fetchNews"] == "false" and news["checkForUpdates"] is False
            themes = lab.api("GET", "/lab/api/settings/@jupyterlab/apputils-extension:themes")["settings"]
            assert themes["theme"] == "JupyterLab Dark"  # the user's own, read
            assert lab.api("GET", "/lab/api/workspaces")["workspaces"]["ids"] == []  # nothing of an earlier run
            assert lab.api("GET", "/api/sessions") == []  # no kernel but the one its notebook starts
        finally:
            lab.stop()
    assert {p: audit.file_sha256(p) for p in user.rglob("*") if p.is_file()} == before
