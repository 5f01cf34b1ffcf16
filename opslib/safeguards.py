"""The safeguards a run went without: flagged in its ledger entry, in `opslib audit list` and in the report.

A run can succeed and still have skipped what makes a change safe: a production deploy with no verified
backup or no verify step, a success that never reached a database, a reset that recreated the schema.
Each is named in a short phrase; the ledger entry keeps them, so they are sealed with the run.
"""

from __future__ import annotations

from typing import Any, Mapping

# Runbooks that change the database and, in production, must take a verified backup and verify after.
_CHANGING = ("deploy", "rollback")


def skipped_safeguards(record: Mapping[str, Any]) -> list[str]:
    """The safeguards the run (a sidecar's fields) went without, each as a short phrase; empty when none."""
    found = []
    steps = {s.get("name"): s.get("outcome") for s in record.get("steps") or []}
    outcome = record.get("outcome")
    changed = outcome in ("succeeded", "failed", "interrupted", "abandoned")  # it may have changed something
    if record.get("env") == "production" and record.get("runbook") in _CHANGING and changed:
        if not record.get("backup") or steps.get("backup") != "succeeded":
            found.append("no verified backup")
        if outcome == "succeeded" and steps.get("verify") != "succeeded":
            found.append("no verify step")
    if outcome == "succeeded" and not record.get("database"):
        found.append("no database reached")
    if record.get("schema_recreated"):
        found.append("schema recreated")
    return found
