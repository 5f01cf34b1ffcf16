"""Records auditors can trust: the hash-chained ledger, `opslib audit list/show/verify`, and tampering."""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from opslib.outcome import Outcome
from opslib import audit

from .conftest import audit_cli, copy_of_records


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
    assert all(e["sidecar_sha256"] and e["notebook_sha256"] for e in entries)


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
    entries = audit.read_ledger(records)
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
        if tamper == "ledger line removed":
            del lines[1]
        else:
            lines[1], lines[2] = lines[2], lines[1]
        (records / audit.LEDGER).write_text("\n".join(lines) + "\n")
        named = "ledger line 2"
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
