"""The ledger as a list of runs: one row per run, as `opslib audit list`, the report and the summary show it."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from opslib.audit import ended_entries, is_start, read_ledger
from opslib.record import revisions_text


def _duration(record: dict) -> float | None:
    try:
        start = datetime.fromisoformat(record["started_at"].replace("Z", "+00:00"))
        end = datetime.fromisoformat(record["finished_at"].replace("Z", "+00:00"))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return round((end - start).total_seconds(), 3)


def run_row(entry: dict) -> dict:
    """A ledger entry as one row of `opslib audit list`: when, runbook, env, operator, database,
    revisions, outcome, duration, the safeguards it went without, who approved it and who signed its ending
    (an edited entry missing a field shows it empty)."""
    database = entry.get("database") or {}
    before = revisions_text(entry.get("revisions_before"), "+")
    after = revisions_text(entry.get("revisions_after"), "+")
    return {
        "run_id": entry.get("run_id"),
        "started_at": entry.get("started_at"),
        "runbook": entry.get("runbook"),
        "env": entry.get("env"),
        "operator": entry.get("operator"),
        "database": database.get("name"),
        "revisions": f"{before} -> {after}" if database else "",
        "outcome": "running" if is_start(entry) else entry.get("outcome"),  # started, no ending yet
        "exit_code": entry.get("exit_code"),
        "duration_s": _duration(entry),
        "warnings": list(entry.get("warnings") or []),
        "approved_by": approved_by(entry),
        "signed_by": entry.get("signer") or "",
    }


def approved_by(entry: dict) -> str:
    """Who approved a run, as its ledger entry seals it: each approval of its plan that counted, and each answer
    in a gate outside opslib, named with the gate ("alice@example.com; bob (airflow)"); empty when none."""
    names = []
    for item in entry.get("approvals") or []:
        principal, source, counted = (list(item) + [None, None, None])[:3] if isinstance(item, list) else (None, None, None)
        if source == "ssh" and counted is True:
            names.append(str(principal))
        elif source not in (None, "ssh"):
            names.append(f"{principal} ({source})")
    return "; ".join(names)


def list_runs(records_dir: Path) -> list[dict]:
    """One row per run in the ledger (:func:`run_row`), oldest first; a run not ended yet shows as running."""
    return [run_row(entry) for entry in ended_entries(read_ledger(records_dir))]
