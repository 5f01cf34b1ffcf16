"""The pre-deploy check (`opslib check`, `make pre-deploy-check`) on scenario projects."""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace

from opslib import checks, migrate, naming
from opslib.lint import Severity

from .conftest import ROOT, query, settings_for


def _by_name(report) -> dict:
    return {c.name: c for c in report.checks}


def test_a_deploy_from_empty_is_information_only(settings):
    """Every table the sample touches is created by the same deploy: nothing can hold up traffic."""
    report = checks.pre_deploy(settings)
    assert report.ok, report.to_dict()
    assert report.findings and {f.severity for f in report.findings} == {Severity.INFO}
    assert "information: " in _by_name(report)["squawk lint"].detail
    by_rev = {f.revision: f for f in report.findings}
    assert by_rev["0004"].context == "table products is created by this deploy"


def test_sample_chain_over_rows_passes_with_its_accepted_findings(settings):
    migrate.upgrade(settings, "0003", x_args=["dev_data=true"])  # users and products hold rows
    report = checks.pre_deploy(settings)
    assert report.ok, report.to_dict()
    accepted = {(f.revision, f.rule): f for f in report.findings if f.severity is Severity.ACCEPTED}
    assert ("0007", "ban-drop-column") in accepted and ("0004", "adding-not-nullable-field") in accepted
    assert all("(accepted in the revision file)" in f.reason for f in accepted.values())
    assert accepted[("0004", "adding-not-nullable-field")].context.startswith("table products: ")
    assert " rows, " in accepted[("0004", "adding-not-nullable-field")].context
    assert f"accepted: {len(accepted)} finding(s)" in _by_name(report)["squawk lint"].detail
    assert accepted[("0004", "adding-not-nullable-field")].rows.endswith(" rows")
    assert not [f for f in report.findings if f.revision == "0003"]  # its indexes are built CONCURRENTLY


def test_two_heads_fail_naming_both_and_the_merge(settings, project):
    report = checks.pre_deploy(replace(settings, alembic_ini=project("two_heads")))
    single = _by_name(report)["single head"]
    assert single.status == "fail"
    assert "abcd1111" in single.detail and "abcd2222" in single.detail and "opslib merge" in single.detail


def test_unsafe_vague_and_unrenderable_revisions(settings, project):
    scenario = replace(settings, alembic_ini=project("unsafe_ddl"))
    migrate.upgrade(scenario, "u001")
    query(settings.database_url, "INSERT INTO accounts (name) VALUES ('first customer')")
    report = checks.pre_deploy(scenario)
    got = _by_name(report)
    assert not report.ok
    assert got["squawk lint"].status == "fail"
    assert "u002: adding-required-field on table accounts: 1 row, " in got["squawk lint"].detail
    # Naming is a rule for new revisions: one already in the history warns (`check --new` blocks it).
    assert got["migration naming"].status == "warn" and "u003: 'fix stuff'" in got["migration naming"].detail
    assert got["migration naming"].revisions == ("u003",)
    assert got["SQL renders offline"].status == "warn" and "u004" in got["SQL renders offline"].detail
    assert {f.revision for f in report.findings} >= {"u002"}  # the rest was still linted


def test_an_accepted_finding_passes_with_its_reason(settings, project):
    ini = project("unsafe_ddl")
    rev = ini.parent / "versions" / "u002_add_balance.py"
    rev.write_text(
        rev.read_text().replace(
            "def upgrade():",
            "# opslib-accept: adding-required-field -- accounts is empty in every environment\ndef upgrade():",
        )
    )
    scenario = replace(settings, alembic_ini=ini)
    migrate.upgrade(scenario, "u001")
    query(settings.database_url, "INSERT INTO accounts (name) VALUES ('first customer')")
    report = checks.pre_deploy(scenario, "u002")
    assert _by_name(report)["squawk lint"].status in ("pass", "warn")
    (finding,) = [f for f in report.findings if f.severity is Severity.ACCEPTED]
    assert finding.reason == "accounts is empty in every environment (accepted in the revision file)"
    assert "accepted: 1 finding(s)" in _by_name(report)["squawk lint"].detail


def test_check_command_and_make_target(run_cli, database_url):
    done = run_cli("check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "squawk lint" in done.stdout and "pre-deploy check: all checks passed" in done.stdout
    wrong = run_cli("check", "--expect-env", "production")
    assert wrong.returncode == 3 and "environment label failed" in wrong.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "MAKE"))}
    env["DATABASE_URL"] = database_url
    made = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "pre-deploy-check"], env=env, capture_output=True, text=True
    )
    assert made.returncode == 0, made.stdout + made.stderr


def test_vague_messages_are_refused_when_a_revision_is_created(run_cli, tmp_path):
    import shutil

    shutil.copytree(
        ROOT / "migrations", tmp_path / "migrations", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "alembic.ini", tmp_path / "alembic.ini")
    env = {"OPSLIB_ALEMBIC_INI": str(tmp_path / "alembic.ini")}
    for message in ("update_database", "fix_stuff", "changes"):
        done = run_cli("revision", "-m", message, env=env)
        assert done.returncode == 2 and "says nothing about the change" in done.stderr
    assert len(list((tmp_path / "migrations" / "versions").glob("*.py"))) == 7
    assert run_cli("revision", "-m", "add_user_profile_table", env=env).returncode == 0
    assert naming.vague_message("remove_deprecated_product_fields") is None


def test_the_deploy_runbook_stops_when_a_check_fails(database_url, project, tmp_path):
    import json

    from .conftest import OPSLIB, schema_snapshot, settings_for

    ini = project("unsafe_ddl")
    migrate.upgrade(settings_for(database_url, tmp_path, ini), "u001")
    query(database_url, "INSERT INTO accounts (name) VALUES ('first customer')")
    before = schema_snapshot(database_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update(DATABASE_URL=database_url, OPSLIB_ALEMBIC_INI=str(ini))
    done = subprocess.run([OPSLIB, "run", "deploy"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "squawk lint failed" in done.stdout + done.stderr and "u002: adding-required-field" in done.stdout + done.stderr
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "records").glob("*.json")]
    assert record["outcome"] == "refused" and record["backup"] is None
    assert {c["name"]: c["status"] for c in record["checks"]}["squawk lint"] == "fail"
    assert schema_snapshot(database_url) == before
    # The refused preflight still shows the plan: the pending revisions, their SQL, and each finding with
    # what to do (squawk's advice and the line that accepts it); the cell's error is one line, once.
    (notebook,) = (tmp_path / "records").glob("*.ipynb")
    (preflight,) = [c for c in json.loads(notebook.read_text())["cells"] if "run.preflight()" in "".join(c["source"])]
    shown = "".join("".join(o["data"]["text/html"]) for o in preflight["outputs"] if o["output_type"] == "display_data")
    assert "Preflight: refused: squawk lint failed, 3 revision(s) not applied" in shown
    assert "pending u002" in shown and "add mandatory balance to accounts" in shown
    assert "ALTER TABLE accounts ADD COLUMN balance INTEGER NOT NULL;" in shown
    assert "<b>Findings: 1 blocking" in shown and "<code>NOT NULL</code>" in shown
    assert "<code># opslib-accept: adding-required-field -- why it is safe here</code> in revision u002" in shown
    (error,) = [o for o in preflight["outputs"] if o["output_type"] == "error"]
    assert len(error["traceback"]) == 1 and "\n" not in error["traceback"][0]
    assert "effectively makes it required" not in error["traceback"][0]  # squawk's paragraph is in the table only


def test_production_backup_check(settings, run_cli):
    from opslib import backup

    production = replace(settings, env="production")
    got = _by_name(checks.pre_deploy(production))["backup"]
    assert got.status == "pass" and "the deploy takes and verifies one first" in got.detail
    assert _by_name(checks.pre_deploy(production, backup_planned=False))["backup"].status == "fail"
    made = backup.backup(production)
    assert backup.verify_backup(production, made.path).ok
    got = _by_name(checks.pre_deploy(production, backup_planned=False))["backup"]
    assert got.status == "pass" and made.path.name in got.detail
    stale = _by_name(checks.pre_deploy(production, backup_planned=False, max_backup_age_h=0))["backup"]
    assert stale.status == "fail" and "newer than 0 h" in stale.detail


def test_table_facts_count_rows_resolve_indexes_and_never_wait_on_a_lock(database_url):
    import psycopg2

    from opslib import db

    from .conftest import libpq

    query(database_url, "CREATE TABLE t (id int); CREATE INDEX ix_t ON t (id); INSERT INTO t VALUES (1), (2)")
    with db.connect(db.parse_url(database_url)) as conn:
        got = db.table_facts(conn, ["t", "ix_t", "missing"])
    assert got["t"].rows == 2 and got["t"].describe().startswith("t: 2 rows, ")
    assert got["ix_t"].name == "t" and got["ix_t"].rows == 2  # an index: the facts of its table
    assert not got["missing"].exists and got["missing"].has_rows is None
    holder = psycopg2.connect(libpq(database_url))
    holder.cursor().execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
    try:
        with db.connect(db.parse_url(database_url)) as conn:
            locked = db.table_facts(conn, ["t"], lock_wait_s=0.2)["t"]
    finally:
        holder.rollback()
        holder.close()
    assert locked.exists and locked.rows is None and "not readable now (locked)" in locked.describe()


def test_a_database_at_two_heads_is_rendered_and_linted_from_both(settings, project):
    branched = replace(settings, alembic_ini=project("two_heads"))
    migrate.upgrade(branched, "heads")
    migrate.merge(branched, "merge title and body branches")
    report = checks.pre_deploy(branched)
    got = _by_name(report)
    assert report.ok, report.to_dict()
    assert got["SQL renders offline"].status == "pass" and got["squawk lint"].status != "skip"
    assert "-- Running upgrade abcd1111, abcd2222 -> " in report.plan.sql.sql


def test_a_merge_revision_is_not_called_irreversible(database_url, project, tmp_path):
    # branchy: two merge revisions whose downgrade is Alembic's own `pass`, beside ordinary revisions.
    branchy = settings_for(database_url, tmp_path, project("branchy"))
    merges = {r.revision for r in migrate.history(branchy) if r.is_merge}
    assert merges == {"d3031b94f025", "fef3fefe337f"}
    report = checks.pre_deploy(branchy, "head", backup_planned=False)
    assert len(report.plan.pending) == 15
    (row,) = [c for c in report.checks if c.name == "downgrades"]
    assert not merges & set(row.revisions) and not any(m in row.detail for m in merges)
