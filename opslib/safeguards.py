"""The safeguards a run went without: flagged in its ledger entry, in `opslib audit list` and in the report.

A run can succeed and still have skipped what makes a change safe: a production deploy with no verified
backup or no verify step, a success that never reached a database, a reset that recreated the schema.
Each is named in a short phrase; the ledger entry keeps them, so they are sealed with the run.
"""

from __future__ import annotations

from typing import Any, Mapping

# Records written before runs kept their runbook's declaration (``backup_gated``, ``changes_database``)
# are read with what the runbooks of that time declared.
_GATED_BEFORE = ("deploy", "rollback")
_CHANGED_NO_DATABASE_BEFORE = ("rehearse",)
# Steps that read the database (or copy it out) and never change it; any other step that began may have.
_READ_ONLY_STEPS = frozenset({"parameters", "preflight", "backup", "verify", "summary"})
# Step outcomes after which the step changed nothing: skipped, refused, bad input, or gave up on a lock.
_NOTHING_DONE = frozenset({"skipped", "refused", "invalid", "locked", "lock timeout"})


def _step_fields(step) -> tuple:
    """(name, outcome) of a step as a sidecar writes it (an object) or a ledger entry keeps it (a list)."""
    if isinstance(step, Mapping):
        name, outcome = step.get("name"), step.get("outcome")
    elif isinstance(step, (list, tuple)):
        name, outcome = (tuple(step) + (None, None))[:2]
    else:
        return None, None
    # An edited file may hold anything there: only text is a name or an outcome.
    return (name if isinstance(name, str) else None), (outcome if isinstance(outcome, str) else None)


def changed_database(record: Mapping[str, Any]) -> bool:
    """Whether the run (a sidecar, or a ledger entry with its steps) may have changed its database: a step
    that changes it began and did not stop at a guard. A record that keeps no steps is judged by its
    outcome, as one that may have changed something unless it was refused, invalid or locked."""
    steps = record.get("steps")
    if not isinstance(steps, list):
        return record.get("outcome") in ("succeeded", "failed", "interrupted", "abandoned")
    return any(
        name not in _READ_ONLY_STEPS and outcome not in _NOTHING_DONE for name, outcome in map(_step_fields, steps)
    )


def backup_gated(record: Mapping[str, Any]) -> bool:
    """Whether the run's runbook gates production runs by a verified backup and a verify step."""
    kept = record.get("backup_gated")
    return kept if isinstance(kept, bool) else record.get("runbook") in _GATED_BEFORE


def changes_its_database(record: Mapping[str, Any]) -> bool:
    """Whether the run's runbook is one that changes its target database (a rehearsal changes a copy)."""
    kept = record.get("changes_database")
    return kept if isinstance(kept, bool) else record.get("runbook") not in _CHANGED_NO_DATABASE_BEFORE


def skipped_safeguards(record: Mapping[str, Any]) -> list[str]:
    """The safeguards the run (a sidecar's fields) went without, each as a short phrase; empty when none.

    The backup and verify flags concern only runs that changed their database (:func:`changed_database`):
    a run refused, or ended in its preflight, went without nothing."""
    found = []
    steps = dict(map(_step_fields, record["steps"] if isinstance(record.get("steps"), list) else []))
    outcome = record.get("outcome")
    changed = changed_database(record)
    if record.get("env") == "production" and backup_gated(record) and changed:
        if not record.get("backup") or steps.get("backup") != "succeeded":
            found.append("no verified backup")
        if outcome == "succeeded" and steps.get("verify") != "succeeded":
            found.append("no verify step")
    if outcome == "succeeded" and not record.get("database"):
        found.append("no database reached")
    if record.get("schema_recreated"):
        found.append("schema recreated")
    return found
