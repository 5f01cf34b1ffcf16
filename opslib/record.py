"""The run record (the design's records contract) as typed values: :class:`RunRecord` and its :class:`Step`.

A run builds and updates one ``RunRecord``; :mod:`opslib.audit` writes it as the JSON sidecar and
seals it into the ledger. Readers of a records folder that may have been edited by hand (the audit
report, `opslib audit show`) read the JSON as it is; :meth:`RunRecord.from_dict` is for records
opslib itself continues (the runner finishing what its kernel wrote, the sealing of abandoned runs).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Sequence

from opslib import __version__
from opslib.outcome import Outcome


@dataclass
class Database:
    """Which database a run worked on: never a URL, never a password."""

    host: str | None
    port: int | None
    name: str | None


@dataclass
class BackupRef:
    """The backup a run took (or restored): its file and checksum."""

    path: str
    sha256: str


@dataclass
class Step:
    """One recorded step: a runbook section, one revision applied, or one attempt that gave up on a lock."""

    name: str
    started_at: str
    duration_s: float | None = None
    outcome: Outcome = Outcome.RUNNING
    error: str | None = None
    revisions: list[str] | None = None  # where the database stood after a failed step, when it was read


# Keys written only when they hold something: the contract's keys are always written.
_OPTIONAL = (
    "checks",
    "findings",
    "migration_output",
    "schema_recreated",
    "acknowledged_irreversible",
    "database_history",
    "fingerprint",
    "last_outcome",
    "sealed_by",
    "closed_at",
    "alembic_ini",
    "version_table",
    "changes_database",
    "backup_gated",
)


@dataclass
class RunRecord:
    """Everything a run's sidecar holds; ``None`` is a fact that was not read (shown as "not read")."""

    run_id: str
    runbook: str
    operator: str
    env: str
    started_at: str
    parameters: dict[str, Any] | None = None
    host: str = field(default_factory=socket.gethostname)
    opslib_version: str = __version__
    git_commit: str | None = None
    git_dirty: bool | None = None  # the checkout had uncommitted changes (to tracked files) when the run began
    # How the run was driven: "headless" (`opslib run`), "interactive" (`opslib open`), or "direct" (the
    # template run in Lab, papermill or Python without opslib around it); and the template's sha256.
    mode: str | None = None
    runbook_sha256: str | None = None
    database: Database | None = None
    revisions_before: list[str] | None = None
    revisions_after: list[str] | None = None
    backup: BackupRef | None = None
    steps: list[Step] = field(default_factory=list)
    outcome: Outcome = Outcome.RUNNING
    exit_code: int | None = None
    error: str | None = None
    notebook: str | None = None
    finished_at: str | None = None
    # The processes that write this record while it runs: a record still `running` whose processes
    # are all gone was abandoned (see audit.seal_abandoned).
    pids: list[int] = field(default_factory=lambda: [os.getpid()])
    checks: list[dict] | None = None
    findings: list[dict] | None = None
    migration_output: dict[str, str] | None = None
    schema_recreated: dict | None = None
    acknowledged_irreversible: list[str] | None = None
    database_history: str | None = None
    fingerprint: str | None = None
    last_outcome: str | None = None  # an abandoned run: the outcome its sidecar held when it was found
    sealed_by: str | None = None  # an abandoned run: the command that sealed it, and when
    closed_at: str | None = None  # when the kernel wrote the ended record for the last time (nothing follows)
    # The Alembic project the run worked with, and its version table [schema, table]: whoever seals the
    # run later (its runner, the next command) reads the revision from this table, not its own project's.
    alembic_ini: str | None = None
    version_table: list[str | None] | None = None
    # Data the run inserted or found already there, per item (init-prod): [{item, table, created, present}].
    data_changes: list[dict] | None = None
    # What the runbook's declaration says of it (see opslib.workflows), kept with the run so that whoever
    # reads the records later needs no runbook's code: whether it changes its target database, and whether
    # its production runs must take a verified backup and end with a verify step.
    changes_database: bool | None = None
    backup_gated: bool | None = None
    # A rehearsal's findings (rehearse): the copy, per-revision timings and locks, and what differed.
    rehearsal: dict | None = None

    def step(self, name: str, started_at: str, **facts: Any) -> Step:
        """Append a step and return it."""
        made = Step(name, started_at, **facts)
        self.steps.append(made)
        return made

    def end(self, outcome: Outcome, exit_code: int | None, error: str | None, finished_at: str) -> None:
        """Set how the run ended."""
        self.outcome, self.exit_code, self.error, self.finished_at = outcome, exit_code, error, finished_at

    def to_dict(self) -> dict[str, Any]:
        """The sidecar's JSON object."""
        data = dataclasses.asdict(self)
        data["outcome"] = str(self.outcome)
        for s in data["steps"]:
            s["outcome"] = str(s["outcome"])
            for key in ("error", "revisions"):
                if s[key] is None:
                    del s[key]
        for key in _OPTIONAL:
            if data[key] is None:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRecord":
        """A record from its sidecar's JSON (unknown keys are dropped, missing ones take their defaults)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["outcome"] = _outcome(values.get("outcome", "running"))
        if values.get("database"):
            values["database"] = Database(**values["database"])
        if values.get("backup"):
            values["backup"] = BackupRef(**values["backup"])
        values["steps"] = [
            Step(**{**s, "outcome": _outcome(s.get("outcome", "running"))}) for s in values.get("steps") or []
        ]
        return cls(**values)


def _outcome(value: str) -> Outcome | str:
    try:
        return Outcome(value)
    except ValueError:
        return value  # an outcome this opslib does not know (a newer version's): kept as written


def revisions_text(revisions: Sequence[str] | None, sep: str = ", ") -> str:
    """Revisions as shown everywhere: "base" when none is applied, "not read" when they were not read
    (None): a fact not read is never shown as base."""
    if revisions is None:
        return "not read"
    return sep.join(revisions) or "base"
