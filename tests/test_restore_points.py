"""Which restore point a recovery goes back to, read from the records (no server needed): only the run that made a
point lists it, one whose record was edited since it was sealed is refused, and the target's options."""

from __future__ import annotations

import json

import pytest

from opslib import audit, restorepoints
from opslib.backup import pitr
from opslib.errors import InvalidInput, PreconditionFailed
from opslib.outcome import Outcome
from opslib.record import BackupRef, Database, RestorePoint


def _sealed(records, runbook: str, point_of: str | None = None, database: str = "shop") -> tuple[str, RestorePoint]:
    """A sealed run (its sidecar and ledger ending) whose backup names a restore point: its own (made at its gate),
    or run ``point_of``'s (a recovery's record names the point it went back to). Returns (run id, point)."""
    run_id = audit.new_run_id()
    started = audit.now()
    record = audit.new_record(runbook, run_id, started, operator="alice", env="production")
    record.database = Database("db.internal", 5432, database)
    point = RestorePoint(
        f"opslib-{point_of or run_id}", "0/3000090", "2026-12-07T10:00:00+00:00", "000000010000000000000003",
        "main", "20261207-095500F", "none", ("0041",), "ab" * 32, {"public.orders": 3000},
    )  # fmt: skip
    record.backup = BackupRef(f"pgbackrest:main/{point.backup_label}", "", point)
    record.end(Outcome.SUCCEEDED, 0, None, "2026-12-07T10:01:00Z")
    stem = audit.record_stem(runbook, run_id, started)
    audit.write_sidecar(records, stem, record)
    audit.append_ledger(records, stem, record)
    return run_id, point


def test_only_the_run_that_made_a_point_lists_it_and_the_newest_is_chosen(tmp_path):
    records = audit.ensure_records_dir(tmp_path / "records")
    first, _ = _sealed(records, "deploy")
    second, newest = _sealed(records, "deploy")
    _sealed(records, "recovery", point_of=first)  # went back to the first deploy's point: lists none of its own
    _sealed(records, "deploy", database="other")
    listed = restorepoints.restore_points(records, "shop")
    assert [(p.run_id, p.name) for p in listed] == [(second, f"opslib-{second}"), (first, f"opslib-{first}")]
    assert all(p.point is not None and p.database == "shop" and p.runbook == "deploy" for p in listed)
    assert restorepoints.find_restore_point(records, "shop", "") == newest
    assert restorepoints.find_restore_point(records, "shop", first).name == f"opslib-{first}"


def test_a_point_whose_record_changed_since_sealing_is_refused(tmp_path):
    records = audit.ensure_records_dir(tmp_path / "records")
    run_id, point = _sealed(records, "deploy")
    assert restorepoints.find_restore_point(records, "shop", "") == point
    assert restorepoints.find_restore_point(records, "shop", f"opslib-{run_id}") == point
    with pytest.raises(InvalidInput, match="no restore point 'opslib-nope' of database 'shop'"):
        restorepoints.find_restore_point(records, "shop", "opslib-nope")
    with pytest.raises(PreconditionFailed, match="no restore point of database 'other'"):
        restorepoints.find_restore_point(records, "other", "")
    sidecar = next(records.glob("*_deploy_*.json"))
    data = json.loads(sidecar.read_text())
    data["backup"]["restore_point"]["row_counts"]["public.orders"] = 2000  # a hostile edit of what to compare with
    sidecar.write_text(json.dumps(data))
    with pytest.raises(PreconditionFailed, match="was changed since it was sealed"):
        restorepoints.find_restore_point(records, "shop", "")
    assert [p.point for p in restorepoints.restore_points(records)] == [None]  # listed, as not to be trusted


def test_a_recovery_target_is_one_of_a_point_a_time_and_an_lsn():
    point = RestorePoint("opslib-1", "0/1", "t", "w", "main", "20261207-095500F", "none")
    assert pitr.target_of(point, "", "").options() == [
        "--type=name", "--target=opslib-1", "--target-action=promote", "--set=20261207-095500F",
    ]  # fmt: skip
    on_timeline_3 = RestorePoint("opslib-2", "0/1", "t", "000000030000000000000007", "main", "L", "none")
    assert "--target-timeline=3" in pitr.target_of(on_timeline_3, "", "").options()  # its own, whatever came after
    assert pitr.target_of(None, "2026-12-07 10:00:00+00", "").options() == [
        "--type=time", "--target=2026-12-07 10:00:00+00", "--target-action=promote",
    ]  # fmt: skip
    assert pitr.RecoveryTarget("immediate").options() == ["--type=immediate", "--target-action=promote"]
    for given in ((point, "2026-12-07", ""), (None, "", ""), (None, "t", "0/1")):
        with pytest.raises(InvalidInput, match="exactly one of restore_point, target_time, target_lsn"):
            pitr.target_of(*given)


def test_pgbackrests_error_is_told_with_the_lines_that_say_its_cause():
    from opslib.pgbackrest import failure_text

    said = (
        "2026-12-07 03:37:37.500 P00   WARN: option 'repo1-retention-full' is not set\n"
        "2026-12-07 03:37:37.622 P00  ERROR: [041]: unable to load info file '/r/backup.info' or '/r/backup.info.copy':\n"
        "                                    FileOpenError: unable to open file '/r/backup.info' for read: [13] Permission denied\n"
        "                                    HINT: has a stanza-create been performed?\n"
    )
    assert failure_text(said, 41) == (
        "[041]: unable to load info file '/r/backup.info' or '/r/backup.info.copy': FileOpenError: unable to open "
        "file '/r/backup.info' for read: [13] Permission denied HINT: has a stanza-create been performed?"
    )
    assert failure_text("no error line here", 7) == "exit code 7"
