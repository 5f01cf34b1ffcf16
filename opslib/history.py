"""The history of runs and revisions kept inside the target database, in an ``opslib`` schema.

Alembic keeps only the current revision. opslib adds two append-only tables (a trigger refuses
UPDATE and DELETE):

- ``opslib.revision_events``: one row per revision applied, reversed or stamped, written from
  Alembic's ``on_version_apply`` inside that revision's own transaction, so a row exists exactly
  when its revision committed (opslib supplies the callback to whatever env.py the project has,
  see :mod:`opslib.migrate`);
- ``opslib.runs``: one row per runbook run that reached the database, written when it ends.

The schema is outside ``public``, so a reset (downgrade to base, or dropping ``public``) keeps it;
a restore brings back the history as it was in the backup, which the recovery run then extends.
"""

from __future__ import annotations

import contextvars
import hashlib

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from opslib.record import RunRecord

SCHEMA_DDL = """
CREATE SCHEMA IF NOT EXISTS opslib;
CREATE TABLE IF NOT EXISTS opslib.revision_events (
    id bigserial PRIMARY KEY,
    run_id text,
    revision text NOT NULL,
    from_revisions text[] NOT NULL,
    to_revisions text[],
    direction text NOT NULL,
    message text,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- Added after the first release of this table; NULL in the rows written before.
ALTER TABLE opslib.revision_events ADD COLUMN IF NOT EXISTS to_revisions text[];
CREATE TABLE IF NOT EXISTS opslib.runs (
    run_id text PRIMARY KEY,
    runbook text NOT NULL,
    operator text,
    env text,
    outcome text NOT NULL,
    revisions_before text[],
    revisions_after text[],
    started_at timestamptz,
    finished_at timestamptz
);
-- Each ledger entry's hash, as the run that sealed it wrote it: the records' ledger is checked
-- against this copy, which an editor of the records folder cannot reach.
CREATE TABLE IF NOT EXISTS opslib.ledger_entries (
    seq bigserial PRIMARY KEY,
    ledger_id text NOT NULL,
    run_id text NOT NULL,
    entry_hash text NOT NULL,
    prev_hash text NOT NULL,
    runbook text,
    outcome text,
    sealed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE OR REPLACE FUNCTION opslib.append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'opslib history is append-only: % on %.% refused', TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME;
END $$;
DROP TRIGGER IF EXISTS append_only ON opslib.revision_events;
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON opslib.revision_events
    FOR EACH ROW EXECUTE FUNCTION opslib.append_only();
DROP TRIGGER IF EXISTS append_only ON opslib.ledger_entries;
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON opslib.ledger_entries
    FOR EACH ROW EXECUTE FUNCTION opslib.append_only();
DROP TRIGGER IF EXISTS append_only ON opslib.runs;
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON opslib.runs
    FOR EACH ROW EXECUTE FUNCTION opslib.append_only();
"""

# The advisory-lock key held while the schema is created (another than the run lock's, db.LOCK_KEY).
SCHEMA_LOCK_KEY = int.from_bytes(hashlib.sha256(b"opslib history schema").digest()[:8], "big", signed=True)


_CURRENT = (
    "SELECT to_regclass('opslib.runs') IS NOT NULL AND to_regclass('opslib.ledger_entries') IS NOT NULL AND EXISTS (SELECT 1 FROM information_schema.columns "
    "WHERE table_schema = 'opslib' AND table_name = 'revision_events' AND column_name = 'to_revisions')"
)

# Runs that leave the database as they found it: they never create (or alter) opslib's schema, and keep
# their row and ledger hash there only when the schema is there already (the witness holds the hash).
_LEFT_AS_FOUND = frozenset({"refused", "invalid", "locked"})


def _schema_for(conn: Connection, outcome) -> bool:
    """Whether a run of ``outcome`` may write its row here: made for a run that may have changed the
    database; for one that left it untouched, only if the current schema exists."""
    if str(outcome) not in _LEFT_AS_FOUND:
        ensure_schema(conn)
        return True
    exists = bool(conn.execute(sa.text(_CURRENT)).scalar())
    if conn.in_transaction():
        conn.commit()
    return exists


def ensure_schema(conn: Connection) -> None:
    """Create the opslib schema and its tables if they are missing, or add what an older one lacks
    (committed at once)."""
    if not conn.execute(sa.text(_CURRENT)).scalar():
        # Two sessions creating it at once (a deploy starting its upgrade while the run it locked out
        # writes its row) would both pass IF NOT EXISTS and one fail on the other's catalog row: the
        # creation is serialized, and the second one finds it made.
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        if not conn.execute(sa.text(_CURRENT)).scalar():
            conn.exec_driver_sql(SCHEMA_DDL.replace("%", "%%"))  # the driver formats parameters with %
    if conn.in_transaction():
        conn.commit()


def record_event(
    conn: Connection,
    run_id: str | None,
    revision: str,
    from_revisions,
    to_revisions,
    direction: str,
    message: str,
) -> None:
    """Insert one revision event on ``conn`` (inside whatever transaction it is in): ``revision``
    was applied, reversed or stamped, moving the database from ``from_revisions`` to ``to_revisions``."""
    values = {
        "run_id": run_id,
        "revision": revision,
        "from_revisions": list(from_revisions),
        "to_revisions": list(to_revisions),
        "direction": direction,
        "message": message,
    }
    columns = ", ".join(values)
    if conn.dialect.paramstyle == "pyformat":
        # Straight to the driver (psycopg2): one row per revision, inside each revision's transaction, is
        # on the path of every migration, and SQLAlchemy's statement handling doubles its cost.
        placeholders = ", ".join(f"%({k})s" for k in values)
        conn.exec_driver_sql(
            f"INSERT INTO opslib.revision_events ({columns}) VALUES ({placeholders})", values
        )
        return
    placeholders = ", ".join(f":{k}" for k in values)
    conn.execute(sa.text(f"INSERT INTO opslib.revision_events ({columns}) VALUES ({placeholders})"), values)


def record_step(conn: Connection, run_id: str | None, step) -> None:
    """Insert the event of one Alembic step (``on_version_apply``'s ``step``) on ``conn``, in its transaction."""
    direction = "stamp" if step.is_stamp else ("upgrade" if step.is_upgrade else "downgrade")
    message = (getattr(step.up_revision, "doc", "") or "").strip()
    record_event(
        conn,
        run_id,
        step.up_revision_id,
        step.source_revision_ids,
        step.destination_revision_ids,
        direction,
        message,
    )


def record_run(conn: Connection, record: RunRecord) -> None:
    """Insert a finished run's row (not for a run that left a database without opslib's schema as it was)."""
    if not _schema_for(conn, record.outcome):
        return
    conn.execute(
        sa.text(
            "INSERT INTO opslib.runs (run_id, runbook, operator, env, outcome, revisions_before, revisions_after, "
            "started_at, finished_at) VALUES (:run_id, :runbook, :operator, :env, :outcome, :before, :after, "
            ":started, :finished) ON CONFLICT (run_id) DO NOTHING"
        ),
        {
            "run_id": record.run_id,
            "runbook": record.runbook,
            "operator": record.operator,
            "env": record.env,
            "outcome": str(record.outcome),
            "before": record.revisions_before,
            "after": record.revisions_after,
            "started": record.started_at,
            "finished": record.finished_at,
        },
    )
    conn.commit()


def run_outcome(conn: Connection, run_id: str) -> str | None:
    """The outcome the database's history holds for the run ``run_id`` (None: no row, or no history)."""
    if not conn.execute(sa.text("SELECT to_regclass('opslib.runs') IS NOT NULL")).scalar():
        return None
    return conn.execute(sa.text("SELECT outcome FROM opslib.runs WHERE run_id = :id"), {"id": run_id}).scalar()


def read(conn: Connection) -> tuple[list[dict], list[dict]]:
    """(runs, revision events), oldest first; empty when the database has no opslib history."""
    if not conn.execute(sa.text("SELECT to_regclass('opslib.runs') IS NOT NULL")).scalar():
        return [], []
    runs = [
        dict(r)
        for r in conn.execute(sa.text("SELECT * FROM opslib.runs ORDER BY started_at, run_id")).mappings()
    ]
    events = [
        dict(r) for r in conn.execute(sa.text("SELECT * FROM opslib.revision_events ORDER BY id")).mappings()
    ]
    if conn.in_transaction():
        conn.commit()
    return runs, events


_CURRENT_RUN: contextvars.ContextVar[str | None] = contextvars.ContextVar("opslib_run_id", default=None)


def current_run_id() -> str | None:
    """The id of the runbook run this process is executing, if any (set by the run)."""
    return _CURRENT_RUN.get()


def set_current_run_id(run_id: str | None) -> None:
    """Mark the run this process executes, so revision events name it."""
    _CURRENT_RUN.set(run_id)


def record_ledger_entry(conn: Connection, ledger_id: str, entry: dict) -> None:
    """Insert the hash of a ledger entry just appended to the records' ledger ``ledger_id`` (committed);
    not for a run that left a database without opslib's schema as it was."""
    if not _schema_for(conn, entry.get("outcome")):
        return
    conn.execute(
        sa.text(
            "INSERT INTO opslib.ledger_entries (ledger_id, run_id, entry_hash, prev_hash, runbook, outcome) "
            "VALUES (:ledger_id, :run_id, :hash, :prev_hash, :runbook, :outcome)"
        ),
        {
            "ledger_id": ledger_id,
            "run_id": entry.get("run_id"),
            "hash": entry.get("hash"),
            "prev_hash": entry.get("prev_hash"),
            "runbook": entry.get("runbook"),
            "outcome": entry.get("outcome"),
        },
    )
    conn.commit()


def has_ledger_entry(conn: Connection, run_id: str) -> bool:
    """True when this database holds a ledger entry of run ``run_id``."""
    if not conn.execute(sa.text("SELECT to_regclass('opslib.ledger_entries') IS NOT NULL")).scalar():
        return False
    found = conn.execute(sa.text("SELECT 1 FROM opslib.ledger_entries WHERE run_id = :r LIMIT 1"), {"r": run_id})
    return found.first() is not None


def ledger_entries(conn: Connection) -> list[dict]:
    """The ledger entry hashes anchored in this database, oldest first; empty when it has none."""
    if not conn.execute(sa.text("SELECT to_regclass('opslib.ledger_entries') IS NOT NULL")).scalar():
        return []
    rows = conn.execute(
        sa.text(
            "SELECT seq, ledger_id, run_id, entry_hash, prev_hash, runbook, outcome, sealed_at "
            "FROM opslib.ledger_entries ORDER BY seq"
        )
    )
    return [dict(r._mapping) for r in rows]
