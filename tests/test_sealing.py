"""Sealing runs that could not seal themselves, against a real PostgreSQL.

A killed run is sealed by the next command with the revision read from the run's own version table
(which may belong to another Alembic project than the sealing command's); a run told to stop between
steps (SIGTERM while the operator reads a cell) is sealed there and then, its lock released.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from opslib import audit, db, liveness
from opslib.config import load_settings
from opslib.record import Database, RunRecord

from .conftest import ROOT, dead_pid, opslib_cli, query


def killed_run(records: Path, url: str, stem: str, version_table: list | None, witness: str | None = None) -> None:
    """The sidecar and unheld live mark a run killed with SIGKILL after identifying its database leaves (its
    start entry also in ``witness``, when given, as a run's is in the default one)."""
    parsed = db.parse_url(url)
    record = RunRecord(
        run_id=stem.rsplit("_", 1)[1], runbook="deploy", operator="pytest", env="development",
        started_at="2026-11-26T10:00:00.000Z", pids=[dead_pid()],
        parameters={"database_url_env": "DATABASE_URL"},
        database=Database(parsed.host or parsed.query.get("host"), parsed.port, parsed.database),
        revisions_before=["x0"], version_table=version_table,
    )  # fmt: skip
    records.mkdir(parents=True, exist_ok=True)
    audit.append_started(records, stem, record, witness)  # as every run does before anything else
    audit.write_sidecar(records, stem, record)
    liveness.live_mark_path(records, stem).touch()


def test_a_killed_run_is_sealed_with_the_revision_of_its_own_version_table(database_url, tmp_path):
    # The run's project keeps its versions in app.app_versions; the sealing command's project (the
    # sample one) would look in public.alembic_version, which this database does not have.
    query(database_url, "CREATE SCHEMA app")
    query(database_url, "CREATE TABLE app.app_versions (version_num varchar(32) PRIMARY KEY)")
    query(database_url, "INSERT INTO app.app_versions VALUES ('x7')")
    records = tmp_path / "records"
    known, unknown = "20261126T100000Z_deploy_1111aaaa", "20261126T100001Z_deploy_2222bbbb"
    killed_run(records, database_url, known, ["app", "app_versions"])
    killed_run(records, database_url, unknown, None)  # killed before it read its project's table

    done = opslib_cli(database_url, ROOT / "alembic.ini", tmp_path, "audit", "verify")

    assert done.returncode == 0, done.stderr
    assert "sealed run 1111aaaa (deploy" in done.stderr and "the database is at x7" in done.stderr
    assert "sealed run 2222bbbb (deploy" in done.stderr and "its revision could not be read" in done.stderr
    entries = {e["run_id"]: e for e in audit.read_endings(records)}
    assert entries["1111aaaa"]["outcome"] == "abandoned" and entries["1111aaaa"]["revisions_after"] == ["x7"]
    assert entries["2222bbbb"]["outcome"] == "abandoned" and entries["2222bbbb"]["revisions_after"] is None
    assert not list(records.glob(".*.live"))  # sealed: the marks are gone
    listed = opslib_cli(database_url, ROOT / "alembic.ini", tmp_path, "audit", "list")
    assert "x0 -> x7" in listed.stdout and "x0 -> not read" in listed.stdout


RUN_THEN_WAIT = textwrap.dedent(
    """
    import sys, time
    from opslib import runbook
    run = runbook.start("deploy", {"backup": False})
    run.preflight()
    print(run.record_path, flush=True)
    time.sleep(120)  # an operator reading the preflight's output
    """
)


def test_sigterm_between_steps_seals_the_run_at_once(database_url, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update(DATABASE_URL=database_url, OPSLIB_ALEMBIC_INI=str(ROOT / "alembic.ini"))
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_THEN_WAIT], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True
    )
    sidecar = tmp_path / proc.stdout.readline().strip()
    assert json.loads(sidecar.read_text())["outcome"] == "running"
    held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    assert query(database_url, held)[0][0] == 1  # the run's lock, held while the operator reads

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM  # the signal then ends the process, as it would have

    record = json.loads(sidecar.read_text())
    assert record["outcome"] == "interrupted" and record["exit_code"] == 143
    assert record["revisions_after"] == []  # read afresh: nothing was applied
    assert "SIGTERM" in record["error"]
    assert query(database_url, held)[0][0] == 0
    [entry] = audit.read_endings(sidecar.parent)
    assert entry["outcome"] == "interrupted" and entry["sidecar"] == sidecar.name
    assert audit.verify_ledger(sidecar.parent) == []
    assert not list(sidecar.parent.glob(".*.live"))


def test_a_killed_run_is_sealed_only_by_a_command_that_reaches_its_database(make_database, tmp_path):
    """A command aimed at another database leaves a killed run for one that reaches its own: the run's ending
    is anchored there, and only there can it be told whether the run was sealed once. Verify from elsewhere
    says so and passes; verify aimed at the run's database seals it, anchored, and passes too."""
    own, other = make_database(), make_database()
    records = tmp_path / "records"
    stem = "20261126T100000Z_deploy_3333cccc"
    killed_run(records, own, stem, None, load_settings().ledger_witness)
    (records / f"{stem}.ipynb").write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    elsewhere = opslib_cli(other, ROOT / "alembic.ini", tmp_path, "audit", "verify")
    assert "3333cccc" not in {e["run_id"] for e in audit.read_endings(records)}, elsewhere.stderr
    assert elsewhere.returncode == 0, elsewhere.stdout + elsewhere.stderr
    assert "run 3333cccc (deploy) ended without sealing; its database" in elsewhere.stdout, elsewhere.stdout

    at_home = opslib_cli(own, ROOT / "alembic.ini", tmp_path, "audit", "verify")
    assert at_home.returncode == 0, at_home.stdout + at_home.stderr
    assert "sealed run 3333cccc (deploy" in at_home.stderr
    (ending,) = [e for e in audit.read_endings(records) if e["run_id"] == "3333cccc"]
    assert ending["outcome"] == "abandoned" and ending["notebook"] == f"{stem}.ipynb"
    shown = opslib_cli(own, ROOT / "alembic.ini", tmp_path, "audit", "show", "3333cccc").stdout
    assert f"notebook    : {stem}.ipynb" in shown and "outcome     : abandoned" in shown, shown
    again = opslib_cli(other, ROOT / "alembic.ini", tmp_path, "audit", "verify")
    assert again.returncode == 0, again.stdout + again.stderr  # anchored where it ran: nothing to say elsewhere

    # Its ending cut from the ledger, verified where its database is out of reach: not taken for a run that
    # waits (the witness holds the ending), but a problem, whatever the edited sidecar says.
    lines = (records / audit.LEDGER).read_text().splitlines()
    (records / audit.LEDGER).write_text("\n".join(line for line in lines if '"abandoned"' not in line) + "\n")
    cut = opslib_cli(other, ROOT / "alembic.ini", tmp_path, "audit", "verify")
    assert cut.returncode == 3 and "3333cccc" in cut.stdout and "ended without sealing; its database" not in cut.stdout, cut.stdout
    blind = opslib_cli(other, ROOT / "alembic.ini", tmp_path, "audit", "verify", env={"OPSLIB_LEDGER_WITNESS": "off"})
    assert blind.returncode == 3 and "3333cccc" in blind.stdout, blind.stdout  # no witness to tell: a problem
