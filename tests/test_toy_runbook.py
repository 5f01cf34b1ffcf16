"""A runbook added from outside opslib by one module and one notebook (tests/fixtures/toy_runbook/): the
registry finds it, and `opslib runbooks`, `opslib run --help`, `opslib run`, validation, step order and
the records treat it as one of opslib's own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import nbformat
import papermill
import pytest

from opslib import audit

from .conftest import OPSLIB, ROOT

TOY = ROOT / "tests" / "fixtures" / "toy_runbook"


@pytest.fixture
def toy_env(tmp_path, database_url):
    """The environment of a project that adds the table-count runbook: its module on the path and named in
    OPSLIB_RUNBOOK_MODULES, its notebook in the runbooks folder (beside opslib's own)."""
    folder = tmp_path / "runbooks"
    shutil.copytree(ROOT / "runbooks", folder)
    shutil.copy(TOY / "table-count.ipynb", folder)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update(
        DATABASE_URL=database_url,
        OPSLIB_ALEMBIC_INI=str(ROOT / "alembic.ini"),
        OPSLIB_RUNBOOKS_DIR=str(folder),
        OPSLIB_RUNBOOK_MODULES="toy_runbook",
        PYTHONPATH=os.pathsep.join(filter(None, [str(TOY), os.environ.get("PYTHONPATH")])),
    )
    (tmp_path / "work").mkdir()
    return env


def _opslib(env, cwd, *args):
    return subprocess.run([OPSLIB, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_registry_lists_it_with_its_parameters(toy_env, tmp_path):
    listed = _opslib(toy_env, tmp_path / "work", "runbooks")
    assert listed.returncode == 0, listed.stderr
    assert "table-count: Table count: how many tables one schema holds" in listed.stdout
    assert "    schema: str = 'public'  # the schema whose tables are counted" in listed.stdout
    assert "deploy: " in listed.stdout  # opslib's own stay
    helped = _opslib(toy_env, tmp_path / "work", "run", "table-count", "--help")
    assert helped.returncode == 0 and "at_least: int = 0" in helped.stdout


def test_it_runs_headless_and_is_recorded_as_a_runbook_that_changes_nothing(toy_env, tmp_path):
    work = tmp_path / "work"
    done = _opslib(toy_env, work, "run", "table-count", "-p", "schema", "opslib", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["runbook"], result["outcome"], result["exit_code"]) == ("table-count", "succeeded", 0)
    record = json.loads(Path(result["record"]).read_text())
    assert [s["name"] for s in record["steps"]] == ["parameters", "preflight", "count", "summary"]
    assert record["parameters"] == {"database_url_env": "DATABASE_URL", "schema": "opslib", "at_least": 0}
    assert record["changes_database"] is False and record["backup_gated"] is False
    ending = audit.read_endings(work / "records")[-1]
    assert ending["changes_database"] is False
    verified = _opslib(toy_env, work, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_its_own_rules_refuse_bad_input_before_any_connection(toy_env, tmp_path):
    env = {**toy_env, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    refused = _opslib(env, tmp_path / "work", "run", "table-count", "-p", "at_least", "-1")
    assert refused.returncode == 2
    assert "table-count: at_least must be 0 or more, not -1" in refused.stderr
    refused = _opslib(env, tmp_path / "work", "run", "table-count", "-p", "at_least", "many")
    assert refused.returncode == 2 and "at_least must be a whole number" in refused.stderr


def test_its_step_order_holds_under_plain_papermill(toy_env, tmp_path, monkeypatch):
    nb = nbformat.read(TOY / "table-count.ipynb", as_version=4)
    count, preflight = nb.cells[7], nb.cells[5]
    nb.cells[5], nb.cells[7] = count, preflight  # the count before the preflight
    source = tmp_path / "swapped.ipynb"
    nbformat.write(nb, source)
    for key, value in toy_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.syspath_prepend(str(TOY))
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(papermill.PapermillExecutionError, match="count needs the preflight step first"):
        papermill.execute_notebook(str(source), str(tmp_path / "out.ipynb"), kernel_name="python3", progress_bar=False)
    record = json.loads(next((tmp_path / "work" / "records").glob("*.json")).read_text())
    assert (record["outcome"], record["exit_code"]) == ("refused", 3)


def test_the_registry_refuses_a_module_that_cannot_be_imported(toy_env, tmp_path):
    env = {**toy_env, "OPSLIB_RUNBOOK_MODULES": "no_such_runbook_module"}
    refused = _opslib(env, tmp_path / "work", "runbooks")
    assert refused.returncode == 2
    assert "OPSLIB_RUNBOOK_MODULES: the runbook module no_such_runbook_module cannot be imported" in refused.stderr


def test_a_project_module_cannot_replace_a_runbook_of_opslib_or_misdeclare_its_steps(toy_env, tmp_path):
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "sneaky.py").write_text(
        "from opslib.workflows.deploy import Deploy\n\n\nclass MyDeploy(Deploy):\n    runbook = 'deploy'\n"
        "    backup_gated = False\n"
    )
    (tmp_path / "mods" / "unordered.py").write_text(
        "from opslib.steps import step\nfrom opslib.workflows.workflow import Workflow\n\n\n"
        "class Unordered(Workflow):\n    runbook = 'unordered'\n    steps = ('check',)\n\n"
        "    @step()\n    def count(self):\n        pass\n"
    )
    path = os.pathsep.join([str(tmp_path / "mods"), toy_env["PYTHONPATH"]])
    replaced = _opslib({**toy_env, "PYTHONPATH": path, "OPSLIB_RUNBOOK_MODULES": "sneaky"}, tmp_path / "work", "runbooks")
    assert replaced.returncode == 2
    assert "runbook 'deploy' is declared by both opslib.workflows.deploy and sneaky" in replaced.stderr
    unordered = _opslib({**toy_env, "PYTHONPATH": path, "OPSLIB_RUNBOOK_MODULES": "unordered"}, tmp_path / "work", "runbooks")
    assert unordered.returncode == 2
    assert "Unordered.steps must list each of its step methods once" in unordered.stderr
