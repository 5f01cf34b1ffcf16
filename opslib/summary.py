"""An auditor's summary of a records folder: runs per environment and outcome, the production changes
with their backups and skipped safeguards, and the ledger check. `opslib audit summary [--json]` prints
it, and the audit report shows it as ``summary.html``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from opslib import audit, runlist
from opslib.outcome import CHANGED_NOTHING
from opslib.record import RunRecord
from opslib.safeguards import changed_database, changes_its_database


def audit_summary(records_dir: Path, check: audit.LedgerCheck | None = None) -> dict:
    """The summary as plain data (what ``--json`` prints): ``verification``, ``runs`` (environment ->
    outcome -> count) and ``production_changes`` (oldest first, each with its backup, who approved it and
    who signed its ending)."""
    check = check or audit.check_ledger(records_dir)
    counts: dict[str, Counter] = {}
    changes = []
    runs = audit.ended_entries(check.entries)
    for entry in runs:
        env, outcome = str(entry.get("env")), "running" if audit.is_start(entry) else str(entry.get("outcome"))
        counts.setdefault(env, Counter())[outcome] += 1
        if env == "production" and changes_its_database(entry) and _changed(entry, outcome):
            backup = RunRecord.tolerant(_sidecar(records_dir, entry)).backup  # the file may have been edited
            row = runlist.run_row(entry)
            changes.append(
                {
                    "run_id": row["run_id"], "runbook": row["runbook"], "started_at": row["started_at"],
                    "operator": row["operator"], "database": row["database"], "revisions": row["revisions"],
                    "outcome": outcome, "backup": backup.path if backup else None,
                    "backup_sha256": backup.sha256 if backup else None,
                    "warnings": row["warnings"], "approved_by": row["approved_by"], "signed_by": row["signed_by"],
                    "approvals_needed": entry.get("approvals_needed"),
                }
            )  # fmt: skip
    return {
        "verification": {
            "status": "failed" if check.problems else "passed",
            "runs": len(runs),
            "problems": check.problems,
        },
        "runs": {env: dict(sorted(c.items())) for env, c in sorted(counts.items())},
        "production_changes": changes,
    }


def _changed(entry: dict, outcome: str) -> bool:
    """Whether the run may have changed its database, as its ledger entry says (its steps, sealed with it)."""
    if outcome in CHANGED_NOTHING:
        return False
    return audit.is_start(entry) or changed_database(entry)  # a run still going may be changing it now


def _sidecar(records_dir: Path, entry: dict) -> dict:
    try:
        found = audit.read_sidecar(Path(records_dir), str(entry.get("sidecar", "")).removesuffix(".json"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def summary_text(summary: dict) -> str:
    """What `opslib audit summary` prints."""
    v = summary["verification"]
    lines = [f"ledger check: {v['status']} ({v['runs']} run(s), {len(v['problems'])} problem(s))", ""]
    lines.append("runs per environment and outcome:")
    for env, counts in summary["runs"].items():
        lines.append(f"  {env}: " + ", ".join(f"{n} {o}" for o, n in counts.items()))
    lines.append("")
    lines.append(f"production changes: {len(summary['production_changes'])}")
    for c in summary["production_changes"]:
        backup = c["backup"] or "no backup"
        flags = f" [{', '.join(c['warnings'])}]" if c["warnings"] else ""
        approved = f"; approved by {c['approved_by']}" if c["approved_by"] else "; no approval"
        signed = f"; signed by {c['signed_by']}" if c["signed_by"] else ""
        lines.append(f"  {c['started_at']} {c['run_id']} {c['runbook']} {c['outcome']} {c['revisions']}; {backup}"
                     f"{flags}{approved}{signed}")  # fmt: skip
    return "\n".join(lines)
