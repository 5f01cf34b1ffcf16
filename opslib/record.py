"""The run record (the design's records contract) as typed values: :class:`RunRecord`, its :class:`Step`,
and the sub-records its runbooks fill (:class:`SchemaRecreated`, :class:`DataChange`, :class:`Rehearsal`
and its parts).

A run builds and updates one ``RunRecord``; :mod:`opslib.audit` writes it as the JSON sidecar and
seals it into the ledger. The JSON has one codec, here: :meth:`RunRecord.to_dict` writes it and
:meth:`RunRecord.from_dict` reads it back, for records opslib itself continues (the runner finishing what
its kernel wrote, the sealing of abandoned runs). A records folder may have been edited by hand: its
readers (`opslib audit show`, the audit report, the auditor's summary) read a sidecar through the one
tolerant reader, :meth:`RunRecord.tolerant`, which never raises whatever the file holds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from opslib import __version__
from opslib.approval import Approval
from opslib.outcome import Outcome

# --- reading JSON values of any shape -------------------------------------------------------------------
# A sub-record's from_dict reads its JSON through these: what opslib wrote comes back unchanged, and a value
# of another shape (a file edited by hand) becomes None or nothing instead of an exception.


def _text(value: Any) -> str | None:
    """Text as written; another value (a number, a list an editor put there) as its JSON text, so that an
    edit is shown, never hidden; None stays None."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _number(value: Any) -> int | float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _whole(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _flag(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _texts(value: Any) -> list[str] | None:
    """A list of text (its None items left out); None when the value is no list."""
    return [_text(v) for v in value if v is not None] if isinstance(value, list) else None


def _mapping(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _encoded(value: Any) -> dict | None:
    return None if value is None else value.to_dict()


def _decoded(kind: Any, value: Any) -> Any:
    """``kind.from_dict(value)`` for a JSON object with something in it; None for anything else."""
    return kind.from_dict(value) if isinstance(value, dict) and value else None


def _decoded_list(kind: Any, value: Any) -> list | None:
    """Each JSON object of a list through ``kind.from_dict`` (other items left out); None when no list."""
    return [kind.from_dict(v) for v in value if isinstance(v, dict)] if isinstance(value, list) else None


@dataclass
class Database:
    """Which database a run worked on: never a URL, never a password."""

    host: str | None
    port: int | None
    name: str | None


@dataclass(frozen=True)
class RestorePoint:
    """A physical backup's gate: the named restore point a run made right before its first change, in the
    pgBackRest stanza that can recover to it, and what the database held there (to check a recovery against).

    ``row_counts`` were read in a snapshot that is exactly the point (the writers held off while it was made);
    ``gate_s`` is the time of the restore point, the WAL switch and the wait until it was archived;
    ``backup_s`` of the pgBackRest backup the gate took first, if any (``backup_taken``: full, incr or none).
    """

    name: str
    lsn: str
    created_at: str
    wal_file: str
    stanza: str
    backup_label: str
    backup_taken: str
    revisions: tuple[str, ...] = ()
    fingerprint: str | None = None
    row_counts: dict[str, int] | None = None
    checksums: dict[str, str] | None = None  # each table's rows' checksum at the point, when the policy asks
    version_table: tuple[str | None, str] | None = None
    gate_s: float | None = None
    backup_s: float | None = None
    counts_s: float | None = None

    def to_dict(self) -> dict:
        """The record's JSON object."""
        data = dataclasses.asdict(self)
        data["revisions"] = list(self.revisions)
        data["version_table"] = list(self.version_table) if self.version_table else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RestorePoint":
        """The value :meth:`to_dict` wrote (odd values read as None or nothing)."""
        counts = data.get("row_counts")
        sums = data.get("checksums")
        table = data.get("version_table")
        return cls(
            **{k: _text(data.get(k)) for k in ("name", "lsn", "created_at", "wal_file", "stanza", "backup_label", "backup_taken")},
            revisions=tuple(_texts(data.get("revisions")) or ()),
            fingerprint=_text(data.get("fingerprint")),
            row_counts={str(k): v for k, v in counts.items() if _whole(v) is not None} if isinstance(counts, dict) else None,
            checksums={str(k): _text(v) for k, v in sums.items()} if isinstance(sums, dict) else None,
            version_table=(_text(table[0]), _text(table[1])) if isinstance(table, list) and len(table) == 2 else None,
            **{k: _number(data.get(k)) for k in ("gate_s", "backup_s", "counts_s")},
        )


@dataclass(frozen=True)
class SealedPoint:
    """A restore point as the ledger sealed it with its run, and the point its record holds (None when the
    record is missing or was changed since it was sealed)."""

    run_id: str
    runbook: str
    outcome: str
    database: str | None
    name: str
    lsn: str
    created_at: str
    stanza: str
    point: RestorePoint | None

    def to_dict(self) -> dict:
        """The JSON of `opslib backups --pgbackrest --json`."""
        return {
            "name": self.name, "lsn": self.lsn, "created_at": self.created_at, "stanza": self.stanza,
            "run_id": self.run_id, "runbook": self.runbook, "outcome": self.outcome, "database": self.database,
            "record_as_sealed": self.point is not None,
            "backup_label": self.point.backup_label if self.point else None,
        }  # fmt: skip


@dataclass
class BackupRef:
    """The backup a run took (or restored): its file and checksum; for a pgBackRest gate, the path names
    the stanza and backup (``pgbackrest:<stanza>/<label>``), the checksum is empty and ``restore_point``
    says where a recovery goes back to."""

    path: str
    sha256: str
    restore_point: RestorePoint | None = None

    def to_dict(self) -> dict:
        """The record's JSON object (a dump's as before: path and checksum)."""
        data = {"path": self.path, "sha256": self.sha256}
        if self.restore_point is not None:
            data["restore_point"] = self.restore_point.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "BackupRef":
        """The value :meth:`to_dict` wrote."""
        return cls(_text(data.get("path")), _text(data.get("sha256")), _decoded(RestorePoint, data.get("restore_point")))


@dataclass
class Step:
    """One recorded step: a runbook section, one revision applied, or one attempt that gave up on a lock."""

    name: str
    started_at: str
    duration_s: float | None = None
    outcome: Outcome = Outcome.RUNNING
    error: str | None = None
    revisions: list[str] | None = None  # where the database stood after a failed step, when it was read


# --- what the runbooks add to a record -------------------------------------------------------------------


@dataclass(frozen=True)
class SchemaRecreated:
    """The reset runbook recreated a schema (public): why, and each object it dropped."""

    reason: str
    dropped: tuple[str, ...] = ()
    schema: str = "public"

    def to_dict(self) -> dict:
        """The record's JSON object."""
        return {"schema": self.schema, "reason": self.reason, "dropped": list(self.dropped)}

    @classmethod
    def from_dict(cls, data: dict) -> "SchemaRecreated":
        """The value :meth:`to_dict` wrote (odd values read as None or nothing)."""
        dropped = tuple(_texts(data.get("dropped")) or ())
        return cls(_text(data.get("reason")), dropped, _text(data.get("schema")))


@dataclass(frozen=True)
class DataChange:
    """Data a run inserted or found already there, for one item (init-prod's essentials): rows created and
    rows that were present."""

    item: str
    table: str
    created: int
    present: int

    def to_dict(self) -> dict:
        """The record's JSON object."""
        return {"item": self.item, "table": self.table, "created": self.created, "present": self.present}

    @classmethod
    def from_dict(cls, data: dict) -> "DataChange":
        """The value :meth:`to_dict` wrote (odd values read as None)."""
        return cls(_text(data.get("item")), _text(data.get("table")), _number(data.get("created")),
                   _number(data.get("present")))  # fmt: skip


@dataclass(frozen=True)
class RehearsalCopy:
    """A rehearsal's scratch copy: its database, and how it was made and in how many seconds (both None
    while it is named and not made yet: whoever ends the run drops it by that name)."""

    database: str
    method: str | None = None  # "template clone" or "restore of <backup file> (…)"
    seconds: float | None = None

    def to_dict(self) -> dict:
        """The record's JSON object."""
        return {"database": self.database, "method": self.method, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: dict) -> "RehearsalCopy":
        """The value :meth:`to_dict` wrote (odd values read as None)."""
        return cls(_text(data.get("database")), _text(data.get("method")), _number(data.get("seconds")))


@dataclass(frozen=True)
class LockHeld:
    """A table lock a revision's transaction held on the copy: the table, the mode, and whether it had rows."""

    table: str
    mode: str
    has_rows: bool

    def to_dict(self) -> dict:
        """The record's JSON object."""
        return {"table": self.table, "mode": self.mode, "has_rows": self.has_rows}

    @classmethod
    def from_dict(cls, data: dict) -> "LockHeld":
        """The value :meth:`to_dict` wrote (odd values read as None)."""
        return cls(_text(data.get("table")), _text(data.get("mode")), _flag(data.get("has_rows")))


@dataclass(frozen=True)
class RehearsedRevision:
    """One revision in one pass of a rehearsal: its time, the locks it held, and the tables with rows it
    locked ACCESS EXCLUSIVE (no reads until it committed)."""

    passage: str  # "upgrade", "downgrade", "upgrade again"; "pass" in the JSON
    revision: str
    seconds: float
    locks: tuple[LockHeld, ...] = ()
    access_exclusive_on_rows: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """The record's JSON object."""
        return {
            "pass": self.passage,
            "revision": self.revision,
            "seconds": self.seconds,
            "locks": [lock.to_dict() for lock in self.locks],
            "access_exclusive_on_rows": list(self.access_exclusive_on_rows),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "RehearsedRevision":
        """The value :meth:`to_dict` wrote (odd values read as None or nothing)."""
        return cls(
            _text(data.get("pass")),
            _text(data.get("revision")),
            _number(data.get("seconds")),
            tuple(_decoded_list(LockHeld, data.get("locks")) or ()),
            tuple(_texts(data.get("access_exclusive_on_rows")) or ()),
        )


@dataclass(frozen=True)
class Differences:
    """What differs between two snapshots of a rehearsal's copy, each a line a person can act on."""

    left_behind: tuple[str, ...] = ()  # objects in the second and not the first
    lost: tuple[str, ...] = ()  # objects in the first and not the second
    changed: tuple[str, ...] = ()  # objects defined otherwise
    data: tuple[str, ...] = ()  # rows gained or lost, columns whose values differ, in tables in both

    @property
    def none(self) -> bool:
        """True when the two snapshots agree."""
        return not (self.left_behind or self.lost or self.changed or self.data)

    def kinds(self) -> list[tuple[str, tuple[str, ...]]]:
        """(kind, its items) for each kind of difference, in the record's order."""
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]

    def lines(self) -> list[str]:
        """Every difference, one line each."""
        return [f"{kind.replace('_', ' ')}: {item}" for kind, items in self.kinds() for item in items]

    def to_dict(self) -> dict:
        """The record's JSON object."""
        return {kind: list(items) for kind, items in self.kinds()}

    @classmethod
    def from_dict(cls, data: dict) -> "Differences":
        """The value :meth:`to_dict` wrote (odd values read as nothing)."""
        return cls(*(tuple(_texts(data.get(f.name)) or ()) for f in dataclasses.fields(cls)))


@dataclass
class RehearsalDifferences:
    """The comparisons of a rehearsal, each set once it is made: what the preparatory downgrade (to
    from_revision) left behind, the downgrade against the copy as it was, and the second upgrade against
    the first."""

    preparatory_downgrade: Differences | None = None
    downgrade_vs_before: Differences | None = None
    upgrade_again_vs_upgrade: Differences | None = None

    def named(self) -> list[tuple[str, Differences]]:
        """(comparison, its differences) for each comparison made, in the record's order."""
        found = ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        return [(name, diff) for name, diff in found if diff is not None]

    def to_dict(self) -> dict:
        """The record's JSON object: only the comparisons made."""
        return {name: diff.to_dict() for name, diff in self.named()}

    @classmethod
    def from_dict(cls, data: dict) -> "RehearsalDifferences":
        """The value :meth:`to_dict` wrote (a comparison this opslib does not know is left out)."""
        return cls(**{f.name: _decoded(Differences, data.get(f.name)) for f in dataclasses.fields(cls)})


@dataclass
class Rehearsal:
    """A rehearsal's findings (the rehearse runbook), filled as it goes: the copy, each revision's time and
    locks per pass, the comparisons, whether the copy was dropped (True, or why not), and the copies of
    killed rehearsals it dropped first."""

    copy: RehearsalCopy | None = None
    revisions: list[RehearsedRevision] = field(default_factory=list)
    differences: RehearsalDifferences = field(default_factory=RehearsalDifferences)
    copy_dropped: bool | str | None = None
    stale_copies_dropped: list[str] | None = None  # written only when some were

    def to_dict(self) -> dict:
        """The record's JSON object."""
        data = {
            "copy": self.copy.to_dict() if self.copy is not None else None,
            "revisions": [r.to_dict() for r in self.revisions],
            "differences": self.differences.to_dict(),
            "copy_dropped": self.copy_dropped,
        }
        if self.stale_copies_dropped is not None:
            data["stale_copies_dropped"] = list(self.stale_copies_dropped)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Rehearsal":
        """The value :meth:`to_dict` wrote (odd values read as None or nothing)."""
        dropped = data.get("copy_dropped")
        return cls(
            _decoded(RehearsalCopy, data.get("copy")),
            _decoded_list(RehearsedRevision, data.get("revisions")) or [],
            RehearsalDifferences.from_dict(_mapping(data.get("differences"))),
            dropped if dropped is None or isinstance(dropped, bool) else _text(dropped),
            _texts(data.get("stale_copies_dropped")),
        )


# Keys written only when they hold something: the contract's keys are always written.
_OPTIONAL = (
    "plan",
    "approvals",
    "approvals_needed",
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
    # The pre-deploy checks and the lint findings that mattered, as the check report writes them (the JSON of
    # CheckResult and lint.Finding, also what `opslib check --json` prints): kept as that data, because their
    # types belong to the check report and to lint (a layer above this one), whose JSON they own.
    checks: list[dict] | None = None
    findings: list[dict] | None = None
    migration_output: dict[str, str] | None = None  # step name -> what its migrations printed or logged
    schema_recreated: SchemaRecreated | None = None
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
    # Data the run inserted or found already there, per item (init-prod).
    data_changes: list[DataChange] | None = None
    # What the runbook's declaration says of it (see opslib.workflows), kept with the run so that whoever
    # reads the records later needs no runbook's code: whether it changes its target database, and whether
    # its production runs must take a verified backup and end with a verify step.
    changes_database: bool | None = None
    backup_gated: bool | None = None
    # A rehearsal's findings (rehearse): the copy, per-revision timings and locks, and what differed.
    rehearsal: Rehearsal | None = None
    # The plan the run was held to (opslib.approval.Plan's JSON), and who approved the run: each signature of
    # the plan as judged at preflight, or an answer in a gate outside opslib (an Airflow approval task).
    plan: dict | None = None
    approvals: list[Approval] | None = None
    approvals_needed: int | None = None  # what the project's policy asked of this run, when it was judged

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
        # The sub-records write their own JSON (asdict would write their field names: "passage", not "pass").
        data["schema_recreated"] = _encoded(self.schema_recreated)
        data["data_changes"] = None if self.data_changes is None else [c.to_dict() for c in self.data_changes]
        data["rehearsal"] = _encoded(self.rehearsal)
        data["backup"] = _encoded(self.backup)
        data["approvals"] = None if self.approvals is None else [a.to_dict() for a in self.approvals]
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
        """A record from its sidecar's JSON (unknown keys are dropped, missing ones take their defaults), its
        runbooks' sub-records read by their own ``from_dict``."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["outcome"] = _outcome(values.get("outcome", "running"))
        if values.get("database"):
            values["database"] = Database(**values["database"])
        if values.get("backup"):
            values["backup"] = BackupRef.from_dict(values["backup"])
        values["steps"] = [
            Step(**{**s, "outcome": _outcome(s.get("outcome", "running"))}) for s in values.get("steps") or []
        ]
        values["schema_recreated"] = _decoded(SchemaRecreated, values.get("schema_recreated"))
        values["data_changes"] = _decoded_list(DataChange, values.get("data_changes"))
        values["rehearsal"] = _decoded(Rehearsal, values.get("rehearsal"))
        values["approvals"] = _approvals(values.get("approvals"))
        return cls(**values)

    @classmethod
    def tolerant(cls, data: Any) -> "RunRecord":
        """The record a sidecar holds, for showing it, whatever an editor left in the file: never raises.

        The one reader of records that may have been edited by hand (`opslib audit show`, the audit report,
        the auditor's summary). Unlike :meth:`from_dict` (for records opslib continues), a missing fact is
        None, not this process's host, pid or version; text of another shape is shown as its JSON, and a
        value of a shape no field can hold is None (`opslib audit show --json` prints the file as it is)."""
        d = _mapping(data)
        output, table = _mapping(d.get("migration_output")), d.get("version_table")
        return cls(
            **{name: _text(d.get(name)) for name in _TEXT_FIELDS},
            parameters=d.get("parameters") if isinstance(d.get("parameters"), dict) else None,
            git_dirty=_flag(d.get("git_dirty")),
            database=_tolerant_database(d.get("database")),
            revisions_before=_texts(d.get("revisions_before")),
            revisions_after=_texts(d.get("revisions_after")),
            backup=_tolerant_backup(d.get("backup")),
            steps=[_tolerant_step(s) for s in _dicts(d.get("steps")) or []],
            outcome=_tolerant_outcome(d.get("outcome")),
            exit_code=_whole(d.get("exit_code")),
            pids=[p for p in d["pids"] if _whole(p) is not None] if isinstance(d.get("pids"), list) else [],
            checks=_dicts(d.get("checks")),
            findings=_dicts(d.get("findings")),
            migration_output={str(k): _text(v) for k, v in output.items()} if output else None,
            schema_recreated=_decoded(SchemaRecreated, d.get("schema_recreated")),
            acknowledged_irreversible=_texts(d.get("acknowledged_irreversible")),
            version_table=[_text(v) for v in table] if isinstance(table, list) else None,
            data_changes=_decoded_list(DataChange, d.get("data_changes")),
            changes_database=_flag(d.get("changes_database")),
            backup_gated=_flag(d.get("backup_gated")),
            rehearsal=_decoded(Rehearsal, d.get("rehearsal")),
            plan=d.get("plan") if isinstance(d.get("plan"), dict) else None,
            approvals=_approvals(d.get("approvals")),
            approvals_needed=_whole(d.get("approvals_needed")),
        )


def _approvals(value: Any) -> list[Approval] | None:
    """The approvals a record holds, each that is one (an item edited into another shape is left out)."""
    if not isinstance(value, list):
        return None
    return [a for a in (Approval.from_dict(v) for v in value) if a is not None]


# The record's facts that are text, read by the tolerant reader as text.
_TEXT_FIELDS = (
    "run_id", "runbook", "operator", "env", "started_at", "host", "opslib_version", "git_commit", "mode",
    "runbook_sha256", "error", "notebook", "finished_at", "database_history", "fingerprint", "last_outcome",
    "sealed_by", "closed_at", "alembic_ini",
)  # fmt: skip


def _dicts(value: Any) -> list[dict] | None:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else None


def _tolerant_database(value: Any) -> Database | None:
    if not isinstance(value, dict) or not value:
        return None  # an empty object says no more than a missing one: "not reached"
    return Database(_text(value.get("host")), _whole(value.get("port")), _text(value.get("name")))


def _tolerant_backup(value: Any) -> BackupRef | None:
    if not isinstance(value, dict) or not value:
        return None
    return BackupRef(_text(value.get("path")), _text(value.get("sha256")), _decoded(RestorePoint, value.get("restore_point")))


def _tolerant_step(data: dict) -> Step:
    return Step(
        _text(data.get("name")),
        _text(data.get("started_at")),
        _number(data.get("duration_s")),
        _tolerant_outcome(data.get("outcome")),
        _text(data.get("error")),
        _texts(data.get("revisions")),
    )


def _tolerant_outcome(value: Any) -> Outcome | str | None:
    text = _text(value)
    return None if text is None else _outcome(text)


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


def git_commit(cwd: Path | None = None) -> str | None:
    """The commit of the project being operated, if it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_dirty(cwd: Path | None = None) -> bool | None:
    """True when tracked files of the project's checkout differ from its commit (None: not a checkout)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None
