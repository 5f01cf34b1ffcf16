"""Run records (the design's records contract).

Every run leaves, in the records folder, ``<UTC yyyymmddTHHMMSSZ>_<runbook>_<run id>``:
``.ipynb`` (the executed notebook, when run through ``opslib run``), ``.json`` (the sidecar, below)
and one line in ``ledger.jsonl``. The sidecar is rewritten after every step, so a run that dies
still leaves what it did; the ledger line is appended once, when the run ends.

Nothing here ever holds a password: databases are recorded as host, port and name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from opslib import signatures, sshsig, witness
from opslib.approval import plan_sha256
from opslib.errors import ConfigError, InvalidInput, PreconditionFailed
from opslib.liveness import live_mark_path, run_is_live
from opslib.policy import ApprovalPolicy
from opslib.record import RunRecord, git_commit, git_dirty
from opslib.redact import clean, clean_json, scrub_json, scrub_password
from opslib.runcontext import RunContext
from opslib.safeguards import changes_its_database, skipped_safeguards

STAMP = "%Y%m%dT%H%M%SZ"
LEDGER = "ledger.jsonl"


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


def new_record(
    runbook: str, run_id: str, started: datetime, *, operator: str, env: str, mode: str | None = None,
    runbook_sha256: str | None = None, approvals: list | None = None,
) -> RunRecord:  # fmt: skip
    """The record of a run that has just started; ``mode`` and ``runbook_sha256`` default to what the
    process that drives the run (`opslib run`, `opslib open`) said in its :class:`RunContext`."""
    context = RunContext.given()
    return RunRecord(
        run_id=run_id,
        runbook=runbook,
        operator=operator,
        env=env,
        started_at=iso(started),
        git_commit=git_commit(),
        git_dirty=git_dirty(),
        mode=mode or (context.mode if context else "direct"),
        runbook_sha256=runbook_sha256 or (context.runbook_sha256 if context else None),
        pids=_run_pids(context),
        approvals=approvals,
    )


def _run_pids(context: RunContext | None) -> list[int]:
    # Under `opslib run` the kernel writes the record and the runner seals it: both are the run's.
    runner = context.runner_pid if context else None
    return [os.getpid()] + ([runner] if runner is not None and runner != os.getpid() else [])


def application_name(runbook: str, run_id: str) -> str:
    """The application_name of every session a run opens: names the run, so a dead run's sessions can be found."""
    return f"opslib {runbook} run {run_id}"


def ensure_records_dir(records_dir: Path) -> Path:
    """The records folder, created if missing; one that cannot hold records is a :class:`ConfigError`."""
    records_dir = Path(records_dir)
    try:
        records_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(
            f"the records folder {records_dir} is a file, not a folder: set OPSLIB_RECORDS_DIR to a folder"
        ) from None
    except OSError as err:
        raise ConfigError(f"cannot create the records folder {records_dir}: {err.strerror}") from None
    if not os.access(records_dir, os.W_OK | os.X_OK):
        raise ConfigError(
            f"the records folder {records_dir} is not writable by this user: set OPSLIB_RECORDS_DIR to one that is"
        )
    return records_dir


def require_records_dir(records_dir: Path) -> Path:
    """The records folder to read: missing is fine (no runs yet), anything else but a folder is a :class:`ConfigError`."""
    records_dir = Path(records_dir)
    if records_dir.exists() and not records_dir.is_dir():
        raise ConfigError(
            f"the records folder {records_dir} is a file, not a folder: set OPSLIB_RECORDS_DIR to a folder"
        )
    return records_dir


def scrub_notebook(path: Path, database_url: str | None) -> None:
    """Remove passwords from an executed notebook before it is sealed: in its text (sources, outputs,
    tracebacks, parameters), every ``scheme://user:password@`` and ``password=``, and the target URL's
    password in raw and percent-encoded forms (a traceback may show either). The JSON is walked, not
    edited as text, so the notebook stays valid whatever the password."""
    text = path.read_text(encoding="utf-8")
    try:
        notebook = json.loads(text)
    except ValueError:  # not JSON (a notebook cut off by a kill): scrubbed as text, it is no notebook anyway
        masked = clean(scrub_password(text, database_url) if database_url else text)
    else:
        scrubbed = scrub_json(notebook, database_url)
        if scrubbed == notebook:
            return
        # nbformat's own layout, so that a scrubbed notebook reads as any other.
        masked = json.dumps(scrubbed, sort_keys=True, indent=1, ensure_ascii=False) + "\n"
    if masked != text:  # replaced whole: a kill while writing leaves the notebook as it was, never cut off
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        tmp.write_text(masked, encoding="utf-8")
        os.replace(tmp, path)


# A record's fields that hold free text (an error, what a migration printed, a check's detail, the
# parameters as given): the run's password is removed from them in every form. The rest are names, ids
# and revisions, read by `audit verify`, sealing and the report: masked by shape only, never rewritten
# because the password is a common word. Inside the free text, these keys still hold names.
RECORD_FREE_TEXT = frozenset(
    {"error", "migration_output", "checks", "findings", "parameters", "database_history", "rehearsal", "data_changes",
     "schema_recreated"}
)  # fmt: skip
RECORD_NAMES = frozenset({"name", "status", "outcome", "rule", "revision", "revisions", "table", "run_id"})


def sidecar_path(records_dir: Path, stem: str) -> Path:
    """Where a run's sidecar JSON lives."""
    return Path(records_dir) / f"{stem}.json"


def write_sidecar(records_dir: Path, stem: str, record: RunRecord) -> Path:
    """Write (or rewrite) a run's sidecar atomically (a kill while writing leaves the previous one whole)."""
    path = sidecar_path(records_dir, stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(json.dumps(clean_json(record.to_dict(), RECORD_FREE_TEXT, RECORD_NAMES), indent=2, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
        raise
    return path


def read_sidecar(records_dir: Path, stem: str) -> dict | None:
    """A run's sidecar as written (JSON), or None when the run never wrote one."""
    path = sidecar_path(records_dir, stem)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def load_record(records_dir: Path, stem: str) -> RunRecord | None:
    """A run's sidecar as a :class:`RunRecord`, to continue it; None when there is none (or it is not JSON)."""
    try:
        data = read_sidecar(records_dir, stem)
    except ValueError:
        return None
    return RunRecord.from_dict(data) if isinstance(data, dict) else None


GENESIS = "0" * 64


def file_sha256(path: Path) -> str | None:
    """The sha256 of a file's bytes; None when there is no such file."""
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


@dataclasses.dataclass(frozen=True)
class Appended:
    """A ledger entry just appended, and the ledger's identity: the hash of its first entry."""

    entry: dict
    ledger_id: str


STARTED = "started"  # the kind of a run's first ledger entry; its ending's has no kind (or "ended")


def is_start(entry: dict) -> bool:
    """Whether a ledger entry is a run's start entry (not its ending)."""
    return entry.get("kind") == STARTED


def append_started(records_dir: Path, stem: str, record: RunRecord, witness_spec: str | None = None,
                   signer: sshsig.Signer | None = None) -> Appended:  # fmt: skip
    """Append the run's ``started`` entry, before it does anything: who, what, with which parameters, and
    the name its sidecar will have. From then on the run is in the ledger: a sidecar no start entry names
    is outside it (`audit verify` fails on it, and no command edits it), and a run started but never
    ended is sealed as abandoned by appending its ending, its files left as they are."""
    entry = {
        "kind": STARTED,
        "run_id": record.run_id,
        "runbook": record.runbook,
        "env": record.env,
        "operator": record.operator,
        "mode": record.mode,
        "runbook_sha256": record.runbook_sha256,
        "parameters": clean_json(record.parameters, frozenset({"parameters"}) | RECORD_FREE_TEXT) if record.parameters else None,
        "started_at": record.started_at,
        "sidecar": f"{stem}.json",
    }
    if record.changes_database is not None:  # what its runbook declares, for a run still going (the summary)
        entry["changes_database"] = record.changes_database
    if record.approvals:  # an outside gate's answer, given before the run began: sealed before it does anything
        entry["approvals"] = signatures.approval_seals(record.approvals)
    appended = _append(Path(records_dir), entry, vouching=False, signer=signer)
    assert appended is not None
    backend = witness.of(witness_spec)
    if backend is not None:  # anchored at once, so a run cut from the ledger is caught even if it reached no database
        backend.append(appended.ledger_id, appended.entry)
    return appended


def append_ledger(records_dir: Path, stem: str, record: RunRecord, signer: sshsig.Signer | None = None) -> Appended | None:
    """Append the run's ending entry to ``ledger.jsonl``, chained to the entry before it; None (nothing
    appended) when the ledger already holds this run's ending: a run is sealed once.

    The entry holds the sha256 of the sidecar and of the executed notebook (when there is one) and
    the hash of the previous entry, so editing, removing or reordering anything shows in
    :func:`verify_ledger`. An exclusive file lock makes the read-last-hash-then-append atomic when
    two runs finish at once; earlier lines are never rewritten.
    """
    records_dir = Path(records_dir)
    notebook = record.notebook
    entry = {
        "run_id": record.run_id,
        "runbook": record.runbook,
        "outcome": str(record.outcome),
        "exit_code": record.exit_code,
        "env": record.env,
        "operator": record.operator,
        "database": dataclasses.asdict(record.database) if record.database else None,
        "revisions_before": record.revisions_before,
        "revisions_after": record.revisions_after,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "sidecar": f"{stem}.json",
        "sidecar_sha256": file_sha256(records_dir / f"{stem}.json"),
        "notebook": notebook,
        "notebook_sha256": file_sha256(records_dir / notebook) if notebook else None,
        "warnings": skipped_safeguards(record.to_dict()),  # sealed with the run: an edit cannot hide them
        "changes_database": changes_its_database(record.to_dict()),
        # Each step as the sidecar holds it, so that an edited step outcome is named (an abandoned run's: as left).
        "steps": step_seals((_json_or_none(records_dir / f"{stem}.json") or {}).get("steps")),
    }
    point = record.backup.restore_point if record.backup else None
    if point is not None:  # where a recovery to this run's gate goes back to, sealed with the run
        entry["restore_point"] = {"name": point.name, "lsn": point.lsn, "created_at": point.created_at, "stanza": point.stanza}
    if record.sealed_by:  # sealed by another command: the ending says by whom, why, and what it last saw
        entry.update(sealed_by=record.sealed_by, error=record.error, last_outcome=record.last_outcome)
    if record.plan is not None or record.approvals or record.approvals_needed:  # who approved it, sealed with the run
        entry.update(
            plan_sha256=plan_sha256(record.plan) if isinstance(record.plan, dict) else None,
            approvals=signatures.approval_seals(record.approvals or []),
            approvals_needed=record.approvals_needed,
        )
    return _append(records_dir, entry, vouching=True, signer=signer)


def step_hash(step: dict) -> str:
    """The hash of one step as the sidecar holds it (its name, outcome, times, error): 16 hex digits of its
    sha256, enough to name an edited step and short enough for a run of hundreds of revisions."""
    return hashlib.sha256(json.dumps(step, sort_keys=True, default=str).encode()).hexdigest()[:16]


def step_seals(steps) -> list[list[str]]:
    """What the ledger keeps of a run's steps: [name, outcome, hash] for each, in order."""
    if not isinstance(steps, list):
        return []
    return [[_text_or_none(s.get("name")), _text_or_none(s.get("outcome")), step_hash(s)] for s in steps if isinstance(s, dict)]


def _text_or_none(value) -> str | None:
    return value if value is None or isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def _append(records_dir: Path, entry: dict, vouching: bool, signer: sshsig.Signer | None = None) -> Appended | None:
    path = records_dir / LEDGER
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            lines = [line for line in f.read().splitlines() if line.strip()]
            if vouching and any(_vouches_for(line, entry["sidecar"]) for line in lines):
                return None
            entry["prev_hash"] = json.loads(lines[-1]).get("hash", GENESIS) if lines else GENESIS
            if signer is not None:
                signatures.sign_entry(entry, signer)
            entry["hash"] = entry_hash(entry)
            ledger_id = json.loads(lines[0]).get("hash", "") if lines else entry["hash"]
            f.seek(0, os.SEEK_END)
            f.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return Appended(entry, ledger_id)


def _vouches_for(line: str, sidecar: str) -> bool:
    """Whether a ledger line is the ending of the run whose sidecar is ``sidecar``."""
    if sidecar not in line:  # most lines: no JSON parsing needed
        return False
    try:
        entry = json.loads(line)
        return entry.get("sidecar") == sidecar and not is_start(entry)
    except (ValueError, AttributeError):
        return False


def ended_entries(entries: list[dict]) -> list[dict]:
    """The runs of a ledger, one entry each, in the order they started: a run's ending entry, or its start
    entry while it has none (a run in progress, or one to seal as abandoned)."""
    endings = {e.get("sidecar"): e for e in entries if not is_start(e)}
    runs, seen = [], set()
    for entry in entries:
        sidecar = entry.get("sidecar")
        if sidecar in seen:
            continue
        seen.add(sidecar)
        runs.append(endings.get(sidecar, entry))
    return runs


@contextmanager
def _ledger_held(records_dir: Path) -> Iterator[None]:
    """A shared lock on the ledger while it is compared with the folder: no run seals (appends its
    entry) between the reading of the ledger and the scan of the sidecars."""
    try:
        fd = os.open(Path(records_dir) / LEDGER, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def read_endings(records_dir: Path) -> list[dict]:
    """The ledger's ending entries (one per sealed run), in file order."""
    return [e for e in read_ledger(records_dir) if not is_start(e)]


def read_ledger(records_dir: Path) -> list[dict]:
    """The ledger's entries, in file order, each value of the type opslib writes there (see :func:`as_written`)."""
    return [entry for entry, _ in _read_entries(records_dir)]


def _read_entries(records_dir: Path) -> list[tuple[dict, list[str]]]:
    path = Path(records_dir) / LEDGER
    if not path.is_file():
        return []
    return [as_written(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


# The type of each value opslib writes in a ledger entry (None aside); fields it does not know are left as
# they are, for a newer opslib's entries.
_TEXT_FIELDS = (
    "kind", "run_id", "runbook", "outcome", "env", "operator", "mode", "runbook_sha256", "started_at",
    "finished_at", "sidecar", "sidecar_sha256", "notebook", "notebook_sha256", "sealed_by", "error",
    "last_outcome", "hash", "prev_hash", "signer", "signature", "signature_error", "plan_sha256",
)  # fmt: skip


def _is_texts(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_where(value) -> bool:
    return isinstance(value, dict) and all(v is None or isinstance(v, (str, int)) for v in value.values())


_ENTRY_TYPES: dict[str, Callable[[Any], bool]] = {
    **{name: (lambda v: isinstance(v, str)) for name in _TEXT_FIELDS},
    "exit_code": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "database": _is_where,
    "parameters": lambda v: isinstance(v, dict),
    "revisions_before": _is_texts,
    "revisions_after": _is_texts,
    "warnings": _is_texts,
    "steps": lambda v: isinstance(v, list) and len(sealed_steps(v)) == len(v),
    "restore_point": _is_where,
    "approvals": lambda v: isinstance(v, list) and all(isinstance(a, list) and len(a) == 3 for a in v),
    "approvals_needed": lambda v: isinstance(v, int) and not isinstance(v, bool),
}


def as_written(raw) -> tuple[dict, list[str]]:
    """A ledger line's entry with each value of a type opslib never writes there (a list of numbers for the
    steps, text for the database) replaced by None, and the names of those fields: every reader may then
    trust a field's type. Such an entry's hash no longer matches, and `audit verify` names it as edited."""
    if not isinstance(raw, dict):
        return {}, ["the line is not a JSON object"]
    odd = [name for name, fits in _ENTRY_TYPES.items() if raw.get(name) is not None and not fits(raw[name])]
    return ({**raw, **dict.fromkeys(odd)} if odd else raw), odd


@dataclass
class LedgerCheck:
    """What :func:`check_ledger` found: each entry's problems (same order as ``entries``) and the
    records no entry vouches for."""

    entries: list[dict]
    by_entry: list[list[str]]
    unvouched: list[str]
    # Runs that ended without sealing whose database is out of reach from here: a command that reaches it
    # seals them (see opslib.sealing.seal_abandoned). Said, not problems: nothing was changed or lost.
    waiting: list[str] = dataclasses.field(default_factory=list)
    # With the project's approvals policy: the entries not signed that `audit verify` names (not problems), how
    # many entries' signatures were checked and hold, and the hashes of those whose signatures do not.
    unsigned: list[str] = dataclasses.field(default_factory=list)
    signed: int = 0
    broken_signatures: set = dataclasses.field(default_factory=set)

    @property
    def problems(self) -> list[str]:
        """Every problem, entries first, as `opslib audit verify` prints them."""
        return [p for found in self.by_entry for p in found] + self.unvouched


def check_ledger(records_dir: Path, out_of_reach: Callable[[RunRecord], bool] | None = None,
                 approvals: ApprovalPolicy | None = None) -> LedgerCheck:  # fmt: skip
    """Compare the records with the ledger: each entry's hash, its place in the chain, and the
    sha256 of its sidecar and notebook; then look for records added outside the ledger.

    With ``approvals`` (the auditor's project's ``[approvals]``, with its allowed_signers), each signed entry's
    signature is checked, and each deploy's approvals (see :mod:`opslib.signatures`).

    ``out_of_reach(record)`` says whether a run that ended without sealing is left for a command that
    reaches its database (:func:`opslib.anchors.out_of_reach`): such a run is ``waiting``, not a problem.

    Raises :class:`~opslib.errors.PreconditionFailed` when ``ledger.jsonl`` is not JSON lines.
    """
    records_dir = Path(records_dir)
    with _ledger_held(records_dir):
        try:
            read = _read_entries(records_dir)
        except ValueError as err:
            raise PreconditionFailed(f"{records_dir / LEDGER} is not valid JSON lines: {err}") from err
        entries = [entry for entry, _ in read]
        signed = _signature_problems(entries, approvals)
        by_entry = _check_entries(records_dir, entries, signed, approvals)
        for i, (found, (entry, odd)) in enumerate(zip(by_entry, read, strict=True), start=1):
            if odd:
                found.insert(0, f"ledger line {i} (run {entry.get('run_id')}): {', '.join(odd)} hold(s) what opslib never writes there (edited)")
        waiting: list[str] = []
        unvouched = _unvouched(records_dir, entries, out_of_reach or (lambda record: False), waiting)
        if approvals is None:
            return LedgerCheck(entries, by_entry, unvouched, waiting)
        holding = sum(1 for e, found in zip(entries, signed, strict=True) if e.get("signature") and not found)
        broken = {e.get("hash") for e, found in zip(entries, signed, strict=True) if found}
        return LedgerCheck(entries, by_entry, unvouched, waiting, signatures.unsigned(entries), holding, broken)


def _labels(entries: list[dict]) -> list[str]:
    return [f"ledger line {i} (run {entry.get('run_id')})" for i, entry in enumerate(entries, start=1)]


def _signature_problems(entries: list[dict], approvals: ApprovalPolicy | None) -> list[list[str]]:
    """Each entry's signature problems (none without ``approvals``: signatures not checked)."""
    if approvals is None:
        return [[] for _ in entries]
    return signatures.entries_problems(entries, _labels(entries), approvals.signers_file)


def _check_entries(records_dir: Path, entries: list[dict], signed: list[list[str]],
                   approvals: ApprovalPolicy | None) -> list[list[str]]:  # fmt: skip
    hashes = {e.get("hash"): i for i, e in enumerate(entries)}
    by_entry = []
    previous = GENESIS
    labels = _labels(entries)
    for i, entry in enumerate(entries, start=1):
        label = labels[i - 1]
        found = list(signed[i - 1])
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
        if approvals is not None and not is_start(entry):  # its approvals, judged by the auditor's policy
            found += signatures.approval_problems(_json_or_none(records_dir / str(entry.get("sidecar"))), entry, label, approvals)
        if is_start(entry):  # the run's files are written after it: its ending vouches for them
            by_entry.append(found)
            continue
        for kind in ("sidecar", "notebook"):
            name = entry.get(kind)
            if not name:
                continue
            actual = file_sha256(records_dir / name)
            if actual is None:
                found.append(f"{label}: {kind} {name} was deleted")
            elif actual != entry.get(f"{kind}_sha256"):
                changes = changed_fields(entry, _json_or_none(records_dir / name)) if kind == "sidecar" else []
                found.append(f"{label}: {kind} {name} was modified" + (f": {'; '.join(changes)}" if changes else ""))
        by_entry.append(found)
    return by_entry


# The facts a ledger entry keeps of its run, which an edited sidecar is compared with.
LEDGER_FIELDS = (
    "run_id", "runbook", "outcome", "exit_code", "env", "operator", "database",
    "revisions_before", "revisions_after", "started_at", "finished_at",
)  # fmt: skip


def field_changes(entry: dict, sidecar: dict) -> list[tuple[str, str, str]]:
    """(fact, what the ledger says, what the file says) for each fact the ledger keeps that the sidecar
    no longer says, its steps included (an edited outcome, or an edited time or error); values as JSON."""
    found = [
        (name, _shown(entry.get(name)), _shown(sidecar.get(name)))
        for name in LEDGER_FIELDS
        if name in entry and entry.get(name) != sidecar.get(name)
    ]
    if isinstance(entry.get("steps"), list):
        found += _step_changes(sealed_steps(entry["steps"]), sealed_steps(step_seals(sidecar.get("steps"))))
    return found


def _step_changes(sealed: list, now: list) -> list[tuple[str, str, str]]:
    found = []
    for i in range(max(len(sealed), len(now))):
        was, is_ = (sealed[i] if i < len(sealed) else None), (now[i] if i < len(now) else None)
        if was == is_:
            continue
        label = f"step {i + 1} ({(was or is_)[0]})"
        if was is None or is_ is None:
            found.append((label, "absent" if was is None else f"{was[0]}: {was[1]}", "absent" if is_ is None else f"{is_[0]}: {is_[1]}"))
        elif was[:2] != is_[:2]:
            found.append((label, f"{was[0]}: {was[1]}", f"{is_[0]}: {is_[1]}"))
        else:
            found.append((label, f"{was[1]}, as sealed", f"{is_[1]}, its times or error edited"))
    return found


def sealed_steps(value) -> list[tuple[str | None, str | None, str | None]]:
    """An ending's ``steps`` as (name, outcome, hash) triples of strings or None, whatever an editor of the
    ledger left there: an entry that is not a list of up to three scalars is skipped (and the entry's hash,
    checked elsewhere, already fails)."""
    if not isinstance(value, list):
        return []
    found = []
    for item in value:
        if isinstance(item, list) and len(item) <= 3:
            name, outcome, digest = (*item, None, None, None)[:3]
            if all(v is None or isinstance(v, str) for v in (name, outcome, digest)):
                found.append((name, outcome, digest))
    return found


def as_sealed(entry: dict, start: dict | None, sidecar: dict) -> dict:
    """The run as its ledger entries say it, over what its sidecar says: the ending's facts (outcome, times,
    database, revisions, who sealed it, or that nobody else did), the start's (mode, template, and each
    parameter given on the command line), and each step's name and outcome where the ending keeps its
    steps (the file's times stay, None where the file has none), and the notebook the ending names (an
    abandoned run's sidecar never names the notebook its runner kept). Every other fact is the file's."""
    shown = dict(sidecar)
    for name in LEDGER_FIELDS:
        if name in entry:
            shown[name] = entry[name]
    if entry.get("notebook"):
        shown["notebook"] = entry["notebook"]
    # A run sealed by its own process has no sealed_by: the ledger says so, whatever the file claims.
    for name in ("sealed_by", "error", "last_outcome"):
        if entry.get("sealed_by"):
            shown[name] = entry.get(name)
    if not entry.get("sealed_by"):
        shown["sealed_by"] = None
    if start is not None:
        for name in ("mode", "runbook_sha256"):
            if name in start:
                shown[name] = start[name]
        given = start.get("parameters")
        if isinstance(given, dict):  # the start keeps only what was given; the file adds the defaults
            files = sidecar.get("parameters") if isinstance(sidecar.get("parameters"), dict) else {}
            shown["parameters"] = {**files, **given}
    if isinstance(entry.get("steps"), list):
        files = sidecar.get("steps") if isinstance(sidecar.get("steps"), list) else []
        shown["steps"] = [
            {
                "started_at": None,
                "duration_s": None,
                **(files[i] if i < len(files) and isinstance(files[i], dict) else {}),
                "name": name,
                "outcome": outcome,
            }
            for i, (name, outcome, _) in enumerate(sealed_steps(entry["steps"]))
        ]
    return shown


def changed_fields(entry: dict, sidecar: dict | None) -> list[str]:
    """Each fact the ledger keeps that the sidecar no longer says, as "FIELD: ledger says X, file says Y"
    (one line when the sidecar is not a JSON object any more)."""
    if not isinstance(sidecar, dict):
        return ["the file no longer holds a record"]
    return [f"{name}: ledger says {ledger}, file says {file}" for name, ledger, file in field_changes(entry, sidecar)]


def _shown(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _json_or_none(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _unsealed(records_dir: Path, vouched: set) -> list[tuple[Path, dict | None]]:
    """Sidecars no ledger entry vouches for, with their JSON (None when it is not JSON)."""
    found = []
    for path in sorted(records_dir.glob("*.json")):
        if path.name in vouched or path.name.startswith("."):
            continue
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = None
        found.append((path, data if isinstance(data, dict) else None))
    return found


def vouched_stems(records_dir: Path) -> set[str]:
    """The runs the ledger vouches for (sealed: their ending is in it), by file stem."""
    return {str(e.get("sidecar", "")).removesuffix(".json") for e in read_ledger(records_dir) if not is_start(e)}


def abandoned_stems(records_dir: Path) -> list[str]:
    """The runs that ended without sealing their record (killed with SIGKILL, a kernel that died, a
    machine that lost power): the ledger holds their start and no ending, and nobody holds their live
    mark. A sidecar the ledger does not name at all is outside it: never sealed, never edited."""
    records_dir = Path(records_dir)
    try:
        entries = read_ledger(records_dir)
    except ValueError:
        return []  # a ledger that is not JSON lines: nothing is sealed onto it (`audit verify` names it)
    started = {e.get("sidecar") for e in entries if is_start(e)}
    vouched = {e.get("sidecar") for e in entries if not is_start(e)}
    return [
        path.stem
        for path, data in _unsealed(records_dir, vouched)
        if path.name in started
        and data is not None
        and data.get("run_id")
        and not run_is_live(records_dir, path.stem, data)
    ]


def has_abandoned(records_dir: Path) -> bool:
    """Whether a writable records folder holds a run to seal as abandoned (a folder this user cannot
    write is only read: its runs are left for a command that can seal them)."""
    if not os.path.isdir(records_dir) or not os.access(records_dir, os.W_OK | os.X_OK):
        return False
    return bool(abandoned_stems(records_dir))


def _unvouched(records_dir: Path, entries: list[dict], out_of_reach: Callable[[RunRecord], bool], waiting: list[str]) -> list[str]:
    endings = [e for e in entries if not is_start(e)]
    started = {e.get("sidecar") for e in entries if is_start(e)}
    vouched = {e.get("sidecar") for e in endings} | {e.get("notebook") for e in endings}
    problems = []
    live_stems = set()
    for path, data in _unsealed(records_dir, vouched):
        if path.name in started and data is not None and run_is_live(records_dir, path.stem, data):
            live_stems.add(path.stem)  # a run in progress: its ending comes when it ends
            continue
        record = _record_of(data) if path.name in started else None
        if record is not None and out_of_reach(record):
            live_stems.add(path.stem)
            waiting.append(
                f"run {record.run_id} ({record.runbook}) ended without sealing; its database "
                f"{record.database.name if record.database else '?'} is out of reach from here: the next "
                f"`opslib audit` or `opslib run` that reaches it seals it (`opslib audit seal {record.run_id}` seals "
                "it here, anchored in the witness alone)"
            )
            continue
        problems.append(
            f"{path.name} was not sealed: its run ended without sealing it (the next `opslib audit` or "
            "`opslib run` seals it as abandoned)"
            if path.name in started and data is not None and data.get("run_id")
            else f"{path.name} is outside the ledger: no start entry names it (added outside it, or its "
            "ledger lines were removed); no opslib command edits it"
        )
    for path in sorted(records_dir.glob("*.ipynb")):
        if path.name in vouched or path.name.startswith(".") or path.stem in live_stems:
            continue
        if live_mark_path(records_dir, path.stem).exists() and run_is_live(records_dir, path.stem, {}):
            continue  # its run has not written its sidecar yet
        problems.append(
            f"{path.name} is not in the ledger (added outside it, or its ledger line was removed)"
        )
    return problems


def _record_of(data) -> RunRecord | None:
    """A sidecar's JSON as a record, or None when it is not one (edited into another shape)."""
    if not isinstance(data, dict) or not data.get("run_id"):
        return None
    try:
        return RunRecord.from_dict(data)
    except (TypeError, ValueError, AttributeError):
        return None


def verify_ledger(records_dir: Path) -> list[str]:
    """Every way the records differ from what the ledger vouches for; an empty list when all is intact.

    Detects an entry edited (its hash), removed or reordered (the chain), a sidecar or notebook
    changed or deleted (their sha256), and a record added outside the ledger. A ledger that is
    not JSON lines is one problem, named.
    """
    try:
        return check_ledger(records_dir).problems
    except PreconditionFailed as err:
        return [err.message]


def find_run(records_dir: Path, run_id: str) -> dict:
    """The run whose id is (or starts with) ``run_id`` as its ledger entries say it over its sidecar (see
    :func:`as_sealed`: an abandoned run's ending is appended, its files stay as its processes left them),
    with its notebook as its ending names it. A sidecar changed since it was sealed adds
    ``changed_after_sealing``: each fact the ledger keeps that the file no longer says."""
    entries = read_ledger(records_dir)
    matches = [e for e in ended_entries(entries) if str(e["run_id"]).startswith(run_id)]
    if len(matches) != 1:
        what = "no run" if not matches else f"{len(matches)} runs"
        raise InvalidInput(f"{what} with id {run_id!r} in {records_dir}: `opslib audit list` shows the ids")
    ending = matches[0]
    record = read_sidecar(records_dir, str(ending["sidecar"]).removesuffix(".json"))
    if record is None:
        raise InvalidInput(
            f"the sidecar {ending['sidecar']} of run {run_id} is missing: run `opslib audit verify`"
        )
    if is_start(ending):  # in progress, or to be sealed: only its file says more
        return record
    start = next((e for e in entries if is_start(e) and e.get("sidecar") == ending.get("sidecar")), None)
    shown = as_sealed(ending, start, record)
    if file_sha256(Path(records_dir) / Path(str(ending["sidecar"])).name) != ending.get("sidecar_sha256"):
        shown["changed_after_sealing"] = changed_fields(ending, record) or ["the file, in a fact the ledger does not keep"]
    return shown
