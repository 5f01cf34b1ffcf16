"""Records auditors can trust: the hash-chained ledger, `opslib audit list/show/verify`, and tampering."""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from opslib import audit, runlist
from opslib.outcome import Outcome

from .conftest import _opslib_run, audit_cli, copy_of_records, libpq, outcomes_that_disagree, query


def test_list_show_and_verify_four_runs(recorded_runs):
    work, codes = recorded_runs
    assert codes == [0, 0, 1, 3]
    listed = json.loads(audit_cli(work, "list", "--json").stdout)
    assert [(r["runbook"], r["outcome"]) for r in listed] == [
        ("deploy", "succeeded"), ("rollback", "succeeded"), ("deploy", "failed"), ("reset", "refused"),
    ]  # fmt: skip
    assert listed[0]["revisions"] == "base -> 0007" and listed[1]["revisions"] == "0007 -> 0006"
    text = audit_cli(work, "list").stdout
    assert "succeeded" in text and "refused" in text
    shown = audit_cli(work, "show", listed[2]["run_id"])
    assert shown.returncode == 0 and "failed (exit 1)" in shown.stdout and "b003" in shown.stdout
    assert audit_cli(work, "show", "nope").returncode == 2
    ok = audit_cli(work, "verify")
    assert ok.returncode == 0 and "4 run(s)" in ok.stdout
    entries = audit.read_ledger(work / "records")
    assert entries[0]["prev_hash"] == audit.GENESIS
    assert all(b["prev_hash"] == a["hash"] for a, b in zip(entries, entries[1:], strict=False))
    assert [audit.is_start(e) for e in entries] == [True, False] * 4  # each run: its start, then its ending
    assert all(e["sidecar_sha256"] and e["notebook_sha256"] for e in entries if not audit.is_start(e))


@pytest.mark.parametrize(
    "tamper, message",
    [
        ("notebook byte", "was modified"),
        ("sidecar edit", "was modified"),
        ("record deleted", "was deleted"),
        ("ledger line removed", "the entry before it was removed"),
        ("ledger lines swapped", "out of order"),
    ],
)
def test_each_tampering_is_detected_and_named(recorded_runs, tmp_path, tamper, message):
    copy = copy_of_records(recorded_runs, tmp_path)
    records = copy / "records"
    entries = audit.read_endings(records)
    target = entries[1]
    if tamper == "notebook byte":
        path = records / target["notebook"]
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        named = target["notebook"]
    elif tamper == "sidecar edit":
        path = records / target["sidecar"]
        path.write_text(path.read_text().replace('"succeeded"', '"failed"', 1))
        named = target["sidecar"]
    elif tamper == "record deleted":
        (records / target["sidecar"]).unlink()
        named = target["sidecar"]
    else:
        lines = (records / audit.LEDGER).read_text().splitlines()
        if tamper == "ledger line removed":  # the second run's start
            del lines[2]
        else:
            lines[2], lines[3] = lines[3], lines[2]
        (records / audit.LEDGER).write_text("\n".join(lines) + "\n")
        named = "ledger line 3"
    done = audit_cli(copy, "verify")
    assert done.returncode == 3, done.stdout + done.stderr
    assert message in done.stdout and named in done.stdout


def _append_many(args) -> None:
    folder, worker = args
    for i in range(25):
        stem = f"20260101T000000Z_deploy_{worker}{i:03d}"
        record = audit.new_record("deploy", f"{worker}{i:03d}", audit.now(), operator="t", env="development")
        record.end(Outcome.SUCCEEDED, 0, None, record.started_at)
        audit.write_sidecar(Path(folder), stem, record)
        audit.append_ledger(Path(folder), stem, record)


def test_appends_from_two_processes_at_once_keep_the_chain(tmp_path):
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_append_many, [(str(tmp_path), "a"), (str(tmp_path), "b")]))
    assert len(audit.read_ledger(tmp_path)) == 50
    assert audit.verify_ledger(tmp_path) == []


def _sealed_by_hand(
    records: Path, run_id: str, env: str, steps: list[str], backup: bool, database: bool, outcome=Outcome.SUCCEEDED
) -> None:
    """A run's record written and sealed by hand, as a run that went without a safeguard would leave it; its
    last step ends as the run does."""
    from opslib.record import BackupRef, Database

    stem = f"20260101T000000Z_deploy_{run_id}"
    record = audit.new_record("deploy", run_id, audit.now(), operator="t", env=env)
    for i, name in enumerate(steps, start=1):
        record.step(name, record.started_at, duration_s=0.1, outcome=Outcome.SUCCEEDED if i < len(steps) else outcome)
    record.backup = BackupRef("/backups/app.dump", "0" * 64) if backup else None
    record.database = Database("db", 5432, "app") if database else None
    record.end(outcome, 0 if outcome is Outcome.SUCCEEDED else 1, None, record.started_at)
    audit.write_sidecar(records, stem, record)
    audit.append_ledger(records, stem, record)


def test_runs_that_went_without_a_safeguard_are_flagged(tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    every = ["parameters", "preflight", "backup", "upgrade", "verify", "summary"]
    _sealed_by_hand(records, "clean001", "production", every, backup=True, database=True)
    _sealed_by_hand(records, "nobkp002", "production", [s for s in every if s != "backup"], backup=False, database=True)
    _sealed_by_hand(records, "novrf003", "production", [s for s in every if s != "verify"], backup=True, database=True)
    _sealed_by_hand(records, "nodb0004", "development", ["parameters", "summary"], backup=False, database=False)
    _sealed_by_hand(records, "devnb005", "development", [s for s in every if s != "backup"], backup=False, database=True)
    # Ended in its preflight, before its backup: it changed nothing, and went without nothing.
    _sealed_by_hand(records, "early006", "production", every[:2], backup=False, database=True, outcome=Outcome.ABANDONED)
    _sealed_by_hand(records, "early007", "production", every[:2], backup=False, database=True, outcome=Outcome.FAILED)
    # Ended inside its upgrade without a backup: it may have changed the database.
    _sealed_by_hand(records, "upgr0008", "production", ["parameters", "preflight", "upgrade"], backup=False,
                    database=True, outcome=Outcome.ABANDONED)  # fmt: skip
    flagged = {r["run_id"]: r["warnings"] for r in runlist.list_runs(records)}
    assert flagged == {
        "clean001": [], "nobkp002": ["no verified backup"], "novrf003": ["no verify step"],
        "nodb0004": ["no database reached"], "devnb005": [], "early006": [], "early007": [],
        "upgr0008": ["no verified backup"],
    }  # fmt: skip
    listed = audit_cli(tmp_path, "list", "--warnings")
    assert listed.returncode == 0, listed.stderr
    assert {line.split()[1] for line in listed.stdout.splitlines()[2:]} == {"nobkp002", "novrf003", "nodb0004", "upgr0008"}
    assert "no verified backup" in listed.stdout
    as_json = json.loads(audit_cli(tmp_path, "list", "--json", "--warnings").stdout)
    assert [r["run_id"] for r in as_json] == ["nobkp002", "novrf003", "nodb0004", "upgr0008"]
    # The summary counts as production changes only the runs that may have changed their database.
    changes = json.loads(audit_cli(tmp_path, "summary", "--json").stdout)["production_changes"]
    assert [c["run_id"] for c in changes] == ["clean001", "nobkp002", "novrf003", "upgr0008"]
    refused = audit_cli(tmp_path, "verify", "--warnings")
    assert refused.returncode == 2 and "--warnings belongs to `opslib audit list`" in refused.stderr
    # The warnings are sealed in the ledger: editing the sidecar to hide them is tampering, shown as such.
    assert audit_cli(tmp_path, "verify").returncode == 0


def test_the_auditors_summary_counts_runs_and_lists_production_changes_with_their_backups(tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    every = ["parameters", "preflight", "backup", "upgrade", "verify", "summary"]
    _sealed_by_hand(records, "prod0001", "production", every, backup=True, database=True)
    _sealed_by_hand(records, "prod0002", "production", [s for s in every if s != "backup"], backup=False, database=True)
    _sealed_by_hand(records, "devl0003", "development", every, backup=True, database=True)
    done = audit_cli(tmp_path, "summary", "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["verification"] == {"status": "passed", "runs": 3, "problems": []}
    assert found["runs"] == {"development": {"succeeded": 1}, "production": {"succeeded": 2}}
    assert [(c["run_id"], c["backup"], c["warnings"]) for c in found["production_changes"]] == [
        ("prod0001", "/backups/app.dump", []), ("prod0002", None, ["no verified backup"]),
    ]  # fmt: skip
    text = audit_cli(tmp_path, "summary")
    assert "production changes: 2" in text.stdout and "no backup [no verified backup]" in text.stdout
    (records / "20260101T000000Z_deploy_prod0001.json").write_text("{}")
    tampered = audit_cli(tmp_path, "summary", "--json")
    assert tampered.returncode == 3 and json.loads(tampered.stdout)["verification"]["status"] == "failed"
    report = audit_cli(tmp_path, "report", "--out", str(tmp_path / "site"))
    page = (tmp_path / "site" / "summary.html").read_text()
    assert report.returncode == 3 and 'id="production-changes"' in page and "no verified backup" in page
    assert 'href="summary.html"' in (tmp_path / "site" / "index.html").read_text()
    assert '<a href="runs/0002-20260101T000000Z_deploy_prod0002.html">prod0002</a>' in page  # each run id is a link


def _hashes(folder: Path) -> dict[str, str]:
    """Every file of a records folder by its sha256, lock files aside."""
    return {
        str(p.relative_to(folder)): audit.file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


@pytest.mark.parametrize("kept", [4, 5], ids=["whole runs kept", "cut inside a run"])
def test_a_ledger_cut_short_is_never_laundered_by_opslib_itself(recorded_runs, tmp_path, kept):
    """The issue's `head -10 ledger.jsonl > x && mv x ledger.jsonl`, every file left in place: the runs
    whose lines are gone are outside the ledger, every audit command says so (verify exit 3) and none
    edits a file. A run whose start is kept and ending cut is not sealed again from here, and is a problem."""
    copy = copy_of_records(recorded_runs, tmp_path)
    records = copy / "records"
    lines = (records / audit.LEDGER).read_text().splitlines()
    assert len(lines) == 8  # four runs, a start and an ending each
    (records / audit.LEDGER).write_text("\n".join(lines[:kept]) + "\n")
    files = {name: digest for name, digest in _hashes(records).items() if name != audit.LEDGER}
    for command in (["list"], ["verify"], ["show", audit.read_ledger(records)[0]["run_id"]], ["verify"], ["summary"]):
        done = audit_cli(copy, *command)
        if command == ["verify"]:
            assert done.returncode == 3, done.stdout + done.stderr
            assert "is outside the ledger: no start entry names it" in done.stdout
            verified = done.stdout
    after = _hashes(records)
    assert {name: digest for name, digest in after.items() if name != audit.LEDGER} == files
    now = (records / audit.LEDGER).read_text().splitlines()
    assert now[:kept] == lines[:kept]  # earlier lines are never rewritten
    # Nothing is appended either: the run whose start was kept and ending cut reached a database out of reach
    # here, so it is not sealed again; the witness holds its ending, so it is a cut, never a run that waits.
    assert now == lines[:kept]
    if kept == 5:
        started = json.loads(lines[4])
        assert f"{started['sidecar']} was not sealed" in verified and "ended without sealing; its database" not in verified


def test_each_kind_of_ending_has_one_outcome_in_the_ledger_the_sidecar_and_the_database(
    recorded_runs, server_url, database_url, tmp_path
):
    """Succeeded and failed (the session's runs, on two databases), then a refused run, bad input and a run the
    lock turned away, on this test's: the ledger, the sidecar and opslib.runs say the same of each."""
    import psycopg2

    from opslib.db import LOCK_KEY

    work, _ = recorded_runs
    seen = set()
    for name in {(e.get("database") or {}).get("name") for e in audit.read_endings(work / "records")} - {None}:
        url = server_url.set(database=name).render_as_string(hide_password=False)
        assert outcomes_that_disagree(work / "records", url) == []
        seen |= {e["outcome"] for e in audit.read_endings(work / "records") if (e.get("database") or {}).get("name") == name}
    assert {"succeeded", "failed"} <= seen

    here = tmp_path / "work"
    here.mkdir()
    assert _opslib_run(database_url, here, "deploy", "-p", "target_revision", "0003") == 0
    admin = {"OPSLIB_ADMIN_EMAIL": "admin@example.com", "OPSLIB_ADMIN_PASSWORD": "an-admin-password"}
    assert _opslib_run(database_url, here, "init-prod", **admin) == 3  # a database half-way up is not set up by it
    assert _opslib_run(database_url, here, "deploy") == 0
    assert _opslib_run(database_url, here, "rollback", "-p", "target_revision", "no-such-revision") == 2
    holder = psycopg2.connect(libpq(database_url))
    holder.autocommit = True
    holder.cursor().execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
    try:
        assert _opslib_run(database_url, here, "deploy") == 4
    finally:
        holder.close()
    endings = audit.read_endings(here / "records")
    assert [e["outcome"] for e in endings] == ["succeeded", "refused", "succeeded", "invalid", "locked"]
    assert all(e.get("database") for e in endings)  # each reached the database, and is compared there
    assert outcomes_that_disagree(here / "records", database_url) == []
    # Once opslib's schema is there, every run that reached the database has its row, a refused or locked one
    # too; bad input writes none.
    rows = dict(query(database_url, "SELECT run_id, outcome FROM opslib.runs"))
    assert [rows.get(e["run_id"]) for e in endings] == ["succeeded", "refused", "succeeded", None, "locked"]
