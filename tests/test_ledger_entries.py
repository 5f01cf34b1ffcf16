"""What the audit commands make of ledger entries and sidecars, whatever an editor left in them: no
PostgreSQL needed."""

from __future__ import annotations

from opslib import audit, display, safeguards

ENDING = {
    "run_id": "r1", "runbook": "deploy", "outcome": "failed", "exit_code": 1, "env": "production",
    "operator": "ana", "database": {"host": "db", "port": 5432, "name": "app"},
    "revisions_before": ["0001"], "revisions_after": ["0002"], "started_at": "t0", "finished_at": "t1",
    "sidecar": "r1.json", "warnings": [], "steps": [["backup", "succeeded", "a" * 16], ["upgrade 0002", "failed", "b" * 16]],
}  # fmt: skip
SIDECAR = {
    **{k: v for k, v in ENDING.items() if k not in ("steps", "warnings", "sidecar")},
    "outcome": "succeeded", "sealed_by": "someone else", "parameters": {"target_revision": "head", "backup": True},
    "steps": [{"name": "backup", "outcome": "succeeded", "started_at": "t0", "duration_s": 1.0},
              {"name": "upgrade 0002", "outcome": "succeeded"}],
}  # fmt: skip


def test_an_edited_sidecar_is_shown_as_the_ledger_says_it():
    shown = audit.as_sealed(ENDING, {"kind": "started", "parameters": {"target_revision": "0002"}}, SIDECAR)
    assert shown["outcome"] == "failed" and shown["sealed_by"] is None  # the ledger says its own process sealed it
    assert shown["parameters"] == {"target_revision": "0002", "backup": True}  # the given one, over the file's defaults
    assert [(s["name"], s["outcome"]) for s in shown["steps"]] == [("backup", "succeeded"), ("upgrade 0002", "failed")]
    assert shown["steps"][1]["duration_s"] is None and shown["steps"][0]["duration_s"] == 1.0
    changes = dict((name, (ledger, file)) for name, ledger, file in audit.field_changes(ENDING, SIDECAR))
    assert changes["step 2 (upgrade 0002)"] == ("upgrade 0002: failed", "upgrade 0002: succeeded")
    assert changes["outcome"] == ('"failed"', '"succeeded"')


def test_without_a_start_entry_the_parameters_are_the_files():
    shown = audit.as_sealed(ENDING, None, SIDECAR)
    assert shown["parameters"] == SIDECAR["parameters"]
    assert "parameters" not in display.sealed_facts(has_start=False, has_warnings=True)
    assert "safeguards skipped" not in display.sealed_facts(has_start=True, has_warnings=False)
    assert {"parameters", "driven", "outcome"} <= display.sealed_facts(has_start=True, has_warnings=True)


def test_an_entry_as_opslib_writes_it_is_read_unchanged():
    entry, odd = audit.as_written(ENDING)
    assert entry is ENDING and odd == []


def test_values_of_other_shapes_are_set_aside_and_named():
    raw = {**ENDING, "steps": [[{"a": 1}], 7], "database": "app", "parameters": ["x"], "warnings": [1],
           "exit_code": True, "hash": ["h"]}  # fmt: skip
    entry, odd = audit.as_written(raw)
    assert sorted(odd) == ["database", "exit_code", "hash", "parameters", "steps", "warnings"]
    assert all(entry[name] is None for name in odd) and entry["outcome"] == "failed"
    assert audit.as_written([1, 2]) == ({}, ["the line is not a JSON object"])
    # Readers of an entry so read, and of sidecars with odd steps, do not fail on them.
    shown = audit.as_sealed(entry, {"parameters": "p"}, {**SIDECAR, "steps": "x"})
    assert shown["parameters"] == SIDECAR["parameters"] and shown["steps"] == "x"  # nothing sealed to show instead
    odd_steps = {**SIDECAR, "steps": [["backup", {"b": 1}], 3, {"name": [1]}]}
    assert safeguards.skipped_safeguards(odd_steps) == ["no verified backup", "no verify step"]
    assert safeguards.changed_database({"steps": [[{"x": 1}, None]]}) is True
    assert audit.sealed_steps([["a", "b", "c"], ["a", 1], "x", ["a", "b", "c", "d"]]) == [("a", "b", "c")]


def test_the_sub_records_write_the_sidecars_json_and_read_it_back():
    from opslib.record import (
        DataChange, Differences, LockHeld, Rehearsal, RehearsalCopy, RehearsalDifferences, RehearsedRevision,
        RunRecord, SchemaRecreated,
    )  # fmt: skip

    record = RunRecord.from_dict({**SIDECAR, "steps": SIDECAR["steps"][:1]})  # steps as opslib writes them
    record.schema_recreated = SchemaRecreated("recreate_schema=always", ("table public.a",))
    record.data_changes = [DataChange("admin user", "users", 1, 0)]
    lock = LockHeld("public.a", "ACCESS EXCLUSIVE", True)
    record.rehearsal = Rehearsal(
        RehearsalCopy("app_rehearse_r1", "template clone", 0.5), [RehearsedRevision("upgrade", "0002", 0.1, (lock,), ("public.a",))],
        RehearsalDifferences(downgrade_vs_before=Differences(lost=("table public.b",))), True, ["app_rehearse_r0"],
    )  # fmt: skip
    written = record.to_dict()
    assert written["schema_recreated"] == {"schema": "public", "reason": "recreate_schema=always", "dropped": ["table public.a"]}
    assert list(written["rehearsal"]) == ["copy", "revisions", "differences", "copy_dropped", "stale_copies_dropped"]
    assert written["rehearsal"]["revisions"][0]["pass"] == "upgrade"
    assert RunRecord.from_dict(written).to_dict() == written
    assert "downgrade vs before: lost: table public.b" in display.record_text(RunRecord.from_dict(written))


def test_the_tolerant_reader_shows_an_edited_sidecar_whatever_it_holds():
    from opslib.record import RunRecord

    odd = {**SIDECAR, "operator": 42, "database": "app", "steps": [{"name": "backup", "duration_s": "x"}, 3],
           "rehearsal": {"copy": ["x"], "revisions": [{"seconds": "y", "locks": 1}]}, "backup": [1], "exit_code": "0"}  # fmt: skip
    record = RunRecord.tolerant(odd)
    assert record.operator == "42" and record.database is None and record.exit_code is None
    text = display.run_text(record, ["outcome: ledger says x, file says y"])
    assert text.startswith("CHANGED AFTER THE RUN") and "42 on None" in text and "not reached" in text
    for junk in (None, [], "x", {"steps": "x", "rehearsal": []}):
        display.run_text(RunRecord.tolerant(junk))


def test_an_abandoned_runs_notebook_is_the_one_its_ending_names_on_every_page():
    """The runner keeps the notebook of a run whose kernel was killed, and its ending names it; the run's own
    sidecar, left as the kernel wrote it, never does. `audit show` and the report's run page both read the
    run through as_sealed: neither may say "not kept"."""
    ending = {**ENDING, "outcome": "abandoned", "exit_code": None, "notebook": "r1.ipynb"}
    sidecar = {**SIDECAR, "notebook": None}
    shown = audit.as_sealed(ending, None, sidecar)
    facts = dict(display.run_facts(audit.RunRecord.tolerant(shown), []))
    assert shown["notebook"] == "r1.ipynb" and facts["notebook"] == "r1.ipynb"
    assert audit.as_sealed({**ENDING, "notebook": None}, None, {**SIDECAR, "notebook": "kept.ipynb"})["notebook"] == "kept.ipynb"
