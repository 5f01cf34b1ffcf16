"""The ledger anchored in the target database, where an editor of the records folder cannot reach.

A hash chain alone cannot see its own tail cut off, nor a ledger replaced by an older copy of itself.
So each run, once its entry is appended to ``records/ledger.jsonl``, also writes that entry's hash into
its database's append-only ``opslib.ledger_entries``, with the ledger's identity (the hash of its first
entry). `opslib audit verify` then cross-checks both ways (:func:`cross_check`): every entry the
database holds for this ledger is in the ledger, with the same hash, and every ledger entry for that
database sealed since anchoring began is in the database. Entries of other ledgers (another records
folder working on the same database) are counted, never taken for this one's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import URL

from opslib import audit, db, witness
from opslib import history as run_history
from opslib.config import Settings
from opslib.errors import InvalidInput, OpsError
from opslib.record import RunRecord


def url_text_of(settings: Settings, record: RunRecord) -> str | None:
    """The URL the run was given, as text: the environment variable its parameters name (database_url_env),
    else DATABASE_URL; None when neither is set here. Holds the password: for connecting and scrubbing only."""
    env_name = (record.parameters or {}).get("database_url_env") or "DATABASE_URL"
    return os.environ.get(str(env_name)) or settings.database_url


def target_of(settings: Settings, record: RunRecord) -> URL | None:
    """The URL of the record's database, from the environment variable its parameters name, if it is
    that database; None when it cannot be known from here (nothing is ever guessed)."""
    text = url_text_of(settings, record)
    try:
        url = db.parse_url(text) if text else db.parse_url(_embedded_if_running(settings) or "")
    except OpsError:
        return None
    database = record.database
    if database is None or _key(url) != (database.host, database.port or 5432, database.name):
        return None
    return url


def _embedded_if_running(settings: Settings) -> str | None:
    from opslib import embedded  # only when no URL is configured

    state = embedded.status(settings)
    return state.url if state.running else None


def anchor(settings: Settings, record: RunRecord, appended) -> bool:
    """Write the hash of the run's ledger entry (``audit.Appended``) into its database, and into the witness
    (on by default); False when the database cannot be identified or reached from here (`audit verify`
    then names the entry as not anchored)."""
    backend = witness.of(settings.ledger_witness)
    if backend is not None:
        backend.append(appended.ledger_id, appended.entry)
    url = target_of(settings, record)
    if url is None:
        return False
    try:
        with db.connect(url) as conn:
            run_history.record_ledger_entry(conn, appended.ledger_id, appended.entry)
    except (OpsError, sa.exc.DBAPIError):
        return False
    return True


def is_anchored(settings: Settings, record: RunRecord) -> bool | None:
    """Whether the run's database holds a ledger entry of this run: True when it was sealed once, whatever
    the records folder says now (its ledger line removed or replaced), so it is never sealed again; None
    when its database cannot be identified or reached from here, so nobody can tell."""
    url = target_of(settings, record)
    if url is None:
        return None
    try:
        with db.connect(url) as conn:
            return run_history.has_ledger_entry(conn, record.run_id)
    except (OpsError, sa.exc.DBAPIError):
        return None


def out_of_reach(settings: Settings) -> Callable[[RunRecord], bool]:
    """For :func:`opslib.audit.check_ledger`: whether a run that ended without sealing is left for a command
    that reaches its database. Its database is out of reach from here, and the witness, the one other place
    that can tell, holds the run's start and no ending of it: never sealed, not an ending cut from the ledger.
    Without a witness to read, it cannot be told apart from a cut, and stays a problem."""
    backend = witness.of(settings.ledger_witness)
    rows = backend.rows() if backend is not None else None

    def waits(record: RunRecord) -> bool:
        if rows is None or record.database is None or is_anchored(settings, record) is not None:
            return False
        kinds = {row.get("outcome") for row in rows if row.get("run_id") == record.run_id}
        return kinds == {audit.STARTED}

    return waits


def _target_url(settings: Settings) -> URL | None:
    text = settings.database_url or _embedded_if_running(settings)
    try:
        return db.parse_url(text) if text else None
    except OpsError:
        return None


def _key(url: URL) -> tuple:
    """(host, port, database name) of a URL, as a run's record names its database."""
    return (url.host or url.query.get("host"), url.port or 5432, url.database)


@dataclass(frozen=True)
class _Source:
    """A database to cross-check with: its URL, where the URL came from, and whether it was asked for."""

    url: URL
    named_by: str
    asked: bool


def _sources(
    settings: Settings, entries: list[dict], databases: Sequence[str], fleet: Sequence[tuple[str, str]]
) -> list[_Source]:
    """Every database to cross-check with, once each: the ``--database`` URLs (asked for), a fleet file's
    targets, the configured target (asked for when no ``--database`` URL is), and each environment variable
    the ledger's runs were given their URL in (``database_url_env``). A ``--database`` URL that does not
    parse is bad input (exit 2); any other is skipped, as one that names no database."""
    found: dict[tuple, _Source] = {}

    def add(text: str | None, named_by: str, asked: bool) -> None:
        try:
            url = db.parse_url(text, source=named_by) if text else None
        except OpsError:
            if asked:
                raise
            return
        if url is not None and url.database:
            found.setdefault(_key(url), _Source(url, named_by, asked))
        elif asked:
            raise InvalidInput(f"{named_by}: the URL names no database: expected postgresql://USER@HOST[:PORT]/DATABASE")

    for text in databases:
        add(text, "--database", True)
    for text, named_by in fleet:
        add(text, named_by, False)
    target = _target_url(settings)
    if target is not None:
        found.setdefault(_key(target), _Source(target, "the configured database", not databases))
    names = {str(_parameters(e).get("database_url_env") or "") for e in entries} - {""}
    for name in sorted(names):
        add(os.environ.get(name), name, False)
    return list(found.values())


def _parameters(entry: dict) -> dict:
    parameters = entry.get("parameters")
    return parameters if isinstance(parameters, dict) else {}


def cross_check(
    settings: Settings,
    entries: list[dict],
    databases: Sequence[str] = (),
    fleet: Sequence[tuple[str, str]] = (),
    require: bool = False,
) -> tuple[str, list[str]]:
    """Check the ledger ``entries`` against the hashes anchored in the witness and in every database it can
    reach: the ``databases`` (``--database`` URLs), the ``fleet`` (URL, where it came from) pairs, the
    configured target, and the URL of each environment variable the ledger's runs name. A database cut out
    of the ledger entirely is still checked when any of these reaches it.

    With ``require``, a ``--database`` URL (or, when none is given, the configured one) that cannot be
    reached is a problem. Returns (what was checked, in one line; the problems found, each naming the run).
    """
    lines, problems = [], []
    backend = witness.of(settings.ledger_witness)
    rows = backend.rows() if backend is not None else None
    if rows is not None:
        ours, others = _this_ledgers(rows, entries)
        problems += _compare(entries, ours, f"the witness {backend}", starts=True)
        lines.append(f"cross-checked with the witness: {len(ours)} entr(ies) of this ledger" + _others(others))
    elif backend is not None:
        lines.append(f"the witness is {backend}: written by each run, compared where those logs are kept")
    sources = _sources(settings, entries, databases, fleet)
    if require and not any(source.asked for source in sources):
        problems.append(
            "--database: not cross-checked with a database (none configured): give --database URL or set DATABASE_URL"
        )
    reached = set()
    for source in sources:
        url = source.url
        try:
            with db.connect(url) as conn:
                anchored = run_history.ledger_entries(conn)
        except (OpsError, sa.exc.DBAPIError) as err:
            message = err.message if isinstance(err, OpsError) else db.driver_message(err, url)
            lines.append(f"not cross-checked with {db.redact_url(url)} ({source.named_by}): {message}")
            if require and source.asked:
                problems.append(f"--database: not cross-checked with {db.redact_url(url)}: {message}")
            continue
        reached.add(_key(url))
        ours, others = _this_ledgers(anchored, entries)
        here = [e for e in entries if _where(e) == _key(url)]
        problems += _compare(here, ours, f"database {url.database}")
        lines.append(
            f"cross-checked with database {url.database}: {len(ours)} entr(ies) of this ledger anchored there"
            + _others(others)
        )
    unreached = sorted({str(_where(e)[2]) for e in entries if isinstance(e.get("database"), dict) and _where(e) not in reached})
    if unreached:
        lines.append(
            f"not cross-checked with {', '.join(unreached)} (no URL for it here: give --database URL, or set "
            "the variable its runs were given)"
        )
    if not sources:
        lines.append("not cross-checked with a database (none configured)")
    return "; ".join(lines), problems


def _this_ledgers(anchored: list[dict], entries: list[dict]) -> tuple[list[dict], int]:
    """The anchored rows of this ledger (its identity, known by a run or an entry it still holds: a ledger
    whose first entry was dropped is still itself), and how many belong to others."""
    runs, hashes = {e.get("run_id") for e in entries}, {e.get("hash") for e in entries}
    ids = {a["ledger_id"] for a in anchored if a["run_id"] in runs or a["ledger_id"] in hashes}
    ours = [a for a in anchored if a["ledger_id"] in ids]
    return ours, len(anchored) - len(ours)


def _others(count: int) -> str:
    return f", {count} of other records folders" if count else ""


def _where(entry: dict) -> tuple:
    """(host, port, database name) of the database a ledger entry names, as :func:`_key` gives a URL's."""
    database = entry.get("database") if isinstance(entry.get("database"), dict) else {}
    return database.get("host"), database.get("port") or 5432, database.get("name")


def _compare(here: list[dict], anchored: list[dict], name: str, starts: bool = False) -> list[str]:
    """What differs between the ledger entries ``here`` and the hashes anchored in ``name`` (a database or
    the witness), each naming the run."""
    problems = []
    if not starts:  # a database holds each run's ending; the witness its start too
        here = [e for e in here if not audit.is_start(e)]
    by_run = {e.get("run_id"): e for e in here}
    hashes = {e.get("hash") for e in here}
    for a in anchored:
        if a.get("entry_hash") in hashes:
            continue
        entry = by_run.get(a["run_id"])
        sealed = a["sealed_at"].strftime("%Y-%m-%d %H:%M:%S %Z")
        if entry is None:
            problems.append(
                f"run {a['run_id']} ({a['runbook']}, {a['outcome']}, "
                f"{'written' if a['outcome'] == 'started' else 'sealed'} {sealed}) is anchored in "
                f"{name} but missing from the ledger: record missing (a cut-off tail, a dropped entry or a "
                "replaced ledger)"
            )
        elif entry.get("hash") != a["entry_hash"]:
            problems.append(
                f"run {a['run_id']}: its ledger entry is not the one anchored in {name} (the ledger was "
                "edited or replaced)"
            )
    if anchored:
        since = anchored[0]["sealed_at"]
        known = {a["run_id"] for a in anchored}
        for entry in here:
            finished = _moment(entry.get("finished_at") or entry.get("started_at"))
            if entry.get("run_id") not in known and finished is not None and finished >= since:
                problems.append(
                    f"run {entry.get('run_id')} is in the ledger but not anchored in {name} (written "
                    "outside a run, or sealed while the database could not be reached)"
                )
    return problems


def _moment(text) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None

