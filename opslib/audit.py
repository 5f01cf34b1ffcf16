"""Run records (the design's records contract).

Every run leaves, in the records folder, ``<UTC yyyymmddTHHMMSSZ>_<runbook>_<run id>``:
``.ipynb`` (the executed notebook, when run through ``opslib run``), ``.json`` (the sidecar, below)
and one line in ``ledger.jsonl``. The sidecar is rewritten after every step, so a run that dies
still leaves what it did; the ledger line is appended once, when the run ends.

Nothing here ever holds a password: databases are recorded as host, port and name.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from opslib import __version__

STAMP = "%Y%m%dT%H%M%SZ"
LEDGER = "ledger.jsonl"
OUTCOMES = ("succeeded", "failed", "refused", "interrupted")

# Set by `opslib run` for the kernel it starts: the record's run id and file stem.
RUN_ID_ENV = "OPSLIB_RUN_ID"
RUN_STEM_ENV = "OPSLIB_RUN_STEM"


def now() -> datetime:
    """The current UTC time."""
    return datetime.now(timezone.utc)


def iso(moment: datetime) -> str:
    """A UTC time as ISO 8601 with milliseconds and a Z."""
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_run_id() -> str:
    """A short random run id."""
    return secrets.token_hex(4)


def record_stem(runbook: str, run_id: str, started: datetime) -> str:
    """The file stem shared by a run's notebook, sidecar and ledger reference."""
    return f"{started.strftime(STAMP)}_{runbook}_{run_id}"


def git_commit(cwd: Path | None = None) -> str | None:
    """The commit of the project being operated, if it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def new_record(runbook: str, run_id: str, started: datetime, *, operator: str, env: str) -> dict:
    """A sidecar for a run that has just started."""
    return {
        "run_id": run_id,
        "runbook": runbook,
        "parameters": None,
        "operator": operator,
        "host": socket.gethostname(),
        "opslib_version": __version__,
        "git_commit": git_commit(),
        "env": env,
        "database": None,
        "revisions_before": None,
        "revisions_after": None,
        "backup": None,
        "steps": [],
        "outcome": "running",
        "exit_code": None,
        "error": None,
        "notebook": None,
        "started_at": iso(started),
        "finished_at": None,
    }


def sidecar_path(records_dir: Path, stem: str) -> Path:
    """Where a run's sidecar JSON lives."""
    return Path(records_dir) / f"{stem}.json"


def write_sidecar(records_dir: Path, stem: str, record: dict) -> Path:
    """Write (or rewrite) a run's sidecar atomically."""
    path = sidecar_path(records_dir, stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_sidecar(records_dir: Path, stem: str) -> dict | None:
    """A run's sidecar, or None when the run never wrote one."""
    path = sidecar_path(records_dir, stem)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def append_ledger(records_dir: Path, stem: str, record: dict) -> Path:
    """Append the run's one line to ``ledger.jsonl`` (opened in append mode: earlier lines are never rewritten)."""
    path = Path(records_dir) / LEDGER
    path.parent.mkdir(parents=True, exist_ok=True)
    line = {
        "run_id": record["run_id"],
        "runbook": record["runbook"],
        "outcome": record["outcome"],
        "exit_code": record["exit_code"],
        "env": record["env"],
        "operator": record["operator"],
        "database": record["database"],
        "revisions_before": record["revisions_before"],
        "revisions_after": record["revisions_after"],
        "started_at": record["started_at"],
        "finished_at": record["finished_at"],
        "sidecar": f"{stem}.json",
        "notebook": record.get("notebook"),
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line, sort_keys=True, default=str) + "\n")
    return path
