"""Run records (the design's records contract).

Every run leaves, in the records folder, ``<UTC yyyymmddTHHMMSSZ>_<runbook>_<run id>``:
``.ipynb`` (the executed notebook, when run through ``opslib run``), ``.json`` (the sidecar, below)
and one line in ``ledger.jsonl``. The sidecar is rewritten after every step, so a run that dies
still leaves what it did; the ledger line is appended once, when the run ends.

Nothing here ever holds a password: databases are recorded as host, port and name.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import socket
import subprocess
from dataclasses import dataclass
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


GENESIS = "0" * 64


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def entry_hash(entry: dict) -> str:
    """The hash of a ledger entry: sha256 of its canonical JSON without its own ``hash`` field."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def append_ledger(records_dir: Path, stem: str, record: dict) -> Path:
    """Append the run's entry to ``ledger.jsonl``, chained to the entry before it.

    The entry holds the sha256 of the sidecar and of the executed notebook (when there is one) and
    the hash of the previous entry, so editing, removing or reordering anything shows in
    :func:`verify_ledger`. An exclusive file lock makes the read-last-hash-then-append atomic when
    two runs finish at once; earlier lines are never rewritten.
    """
    records_dir = Path(records_dir)
    path = records_dir / LEDGER
    path.parent.mkdir(parents=True, exist_ok=True)
    notebook = record.get("notebook")
    entry = {
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
        "sidecar_sha256": _sha256(records_dir / f"{stem}.json"),
        "notebook": notebook,
        "notebook_sha256": _sha256(records_dir / notebook) if notebook else None,
    }
    with open(path, "a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            lines = [line for line in f.read().splitlines() if line.strip()]
            entry["prev_hash"] = json.loads(lines[-1]).get("hash", GENESIS) if lines else GENESIS
            entry["hash"] = entry_hash(entry)
            f.seek(0, os.SEEK_END)
            f.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return path


def read_ledger(records_dir: Path) -> list[dict]:
    """The ledger's entries, in file order."""
    path = Path(records_dir) / LEDGER
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class LedgerCheck:
    """What :func:`check_ledger` found: each entry's problems (same order as ``entries``) and the
    records no entry vouches for."""

    entries: list[dict]
    by_entry: list[list[str]]
    unvouched: list[str]

    @property
    def problems(self) -> list[str]:
        """Every problem, entries first, as `opslib audit verify` prints them."""
        return [p for found in self.by_entry for p in found] + self.unvouched


def check_ledger(records_dir: Path) -> LedgerCheck:
    """Compare the records with the ledger: each entry's hash, its place in the chain, and the
    sha256 of its sidecar and notebook; then look for records added outside the ledger.

    Raises :class:`~opslib.errors.PreconditionFailed` when ``ledger.jsonl`` is not JSON lines.
    """
    from opslib.errors import PreconditionFailed

    records_dir = Path(records_dir)
    try:
        entries = read_ledger(records_dir)
    except ValueError as err:
        raise PreconditionFailed(f"{records_dir / LEDGER} is not valid JSON lines: {err}") from err
    hashes = {e.get("hash"): i for i, e in enumerate(entries)}
    by_entry = []
    previous = GENESIS
    for i, entry in enumerate(entries, start=1):
        label = f"ledger line {i} (run {entry.get('run_id')})"
        found = []
        if entry_hash(entry) != entry.get("hash"):
            found.append(f"{label}: the entry was edited (its hash does not match its content)")
        if entry.get("prev_hash") != previous:
            if entry.get("prev_hash") in hashes:
                found.append(
                    f"{label}: out of order (it follows line {hashes[entry['prev_hash']] + 1} in the chain)"
                )
            else:
                found.append(
                    f"{label}: the entry before it was removed (its predecessor is not in the ledger)"
                )
        previous = entry.get("hash")
        for kind in ("sidecar", "notebook"):
            name = entry.get(kind)
            if not name:
                continue
            actual = _sha256(records_dir / name)
            if actual is None:
                found.append(f"{label}: {kind} {name} was deleted")
            elif actual != entry.get(f"{kind}_sha256"):
                found.append(f"{label}: {kind} {name} was modified")
        by_entry.append(found)
    return LedgerCheck(entries, by_entry, _unvouched(records_dir, entries))


def _unvouched(records_dir: Path, entries: list[dict]) -> list[str]:
    vouched = {e.get("sidecar") for e in entries} | {e.get("notebook") for e in entries}
    problems = []
    for path in sorted(records_dir.glob("*.json")) + sorted(records_dir.glob("*.ipynb")):
        if path.name in vouched or path.name.startswith("."):
            continue
        if path.suffix == ".json":
            try:
                if json.loads(path.read_text()).get("outcome") == "running":
                    continue  # a run in progress: its ledger entry comes when it ends
            except ValueError:
                pass
        problems.append(
            f"{path.name} is not in the ledger (added outside it, or its ledger line was removed)"
        )
    return problems


def verify_ledger(records_dir: Path) -> list[str]:
    """Every way the records differ from what the ledger vouches for; an empty list when all is intact.

    Detects an entry edited (its hash), removed or reordered (the chain), a sidecar or notebook
    changed or deleted (their sha256), and a record added outside the ledger. A ledger that is
    not JSON lines is one problem, named.
    """
    from opslib.errors import PreconditionFailed

    try:
        return check_ledger(records_dir).problems
    except PreconditionFailed as err:
        return [err.message]


def _duration(record: dict) -> float | None:
    try:
        start = datetime.fromisoformat(record["started_at"].replace("Z", "+00:00"))
        end = datetime.fromisoformat(record["finished_at"].replace("Z", "+00:00"))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return round((end - start).total_seconds(), 3)


def run_row(entry: dict) -> dict:
    """A ledger entry as one row of `opslib audit list`: when, runbook, env, operator, database,
    revisions, outcome, duration (an edited entry missing a field shows it empty)."""
    database = entry.get("database") or {}
    before = "+".join(entry.get("revisions_before") or []) or "base"
    after = "+".join(entry.get("revisions_after") or []) or "base"
    return {
        "run_id": entry.get("run_id"),
        "started_at": entry.get("started_at"),
        "runbook": entry.get("runbook"),
        "env": entry.get("env"),
        "operator": entry.get("operator"),
        "database": database.get("name"),
        "revisions": f"{before} -> {after}" if database else "",
        "outcome": entry.get("outcome"),
        "exit_code": entry.get("exit_code"),
        "duration_s": _duration(entry),
    }


def list_runs(records_dir: Path) -> list[dict]:
    """One row per run in the ledger (:func:`run_row`), oldest first."""
    return [run_row(entry) for entry in read_ledger(records_dir)]


def find_run(records_dir: Path, run_id: str) -> dict:
    """The sidecar of the run whose id is (or starts with) ``run_id``."""
    from opslib.errors import InvalidInput

    matches = [e for e in read_ledger(records_dir) if str(e["run_id"]).startswith(run_id)]
    if len(matches) != 1:
        what = "no run" if not matches else f"{len(matches)} runs"
        raise InvalidInput(f"{what} with id {run_id!r} in {records_dir}: `opslib audit list` shows the ids")
    record = read_sidecar(records_dir, matches[0]["sidecar"].removesuffix(".json"))
    if record is None:
        raise InvalidInput(
            f"the sidecar {matches[0]['sidecar']} of run {run_id} is missing: run `opslib audit verify`"
        )
    return record
