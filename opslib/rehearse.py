"""Rehearsals: the guide's "test migrations on a copy of production data", on a scratch copy of the target.

The copy is a template clone when the target is idle (fast, no dump), else the newest verified backup of
the target restored. On it, a rehearsal upgrades to the target revision, downgrades back, and upgrades
again, timing each revision and reading the table locks its transaction held; it then compares what
each pass left:

- after the downgrade against the copy as it was: every object a downgrade left behind or lost (tables,
  columns, types, sequences, functions, extensions, indexes, constraints, views, triggers), and in the
  tables that survive, rows gained or lost and columns whose values changed;
- after the second upgrade against the first: the same, so an upgrade that cannot be run again shows.

The target itself is only read (to copy it): a rehearsal is allowed in production.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from opslib import backup, db, schema
from opslib.config import Settings
from opslib.errors import PreconditionFailed
from opslib.record import Differences, LockHeld, RehearsalCopy, RehearsedRevision

# How the copy was made (RehearsalCopy) and what differs between two snapshots (Differences) are what the
# run's record keeps of them: one type each, defined with the record.


def scratch_name(database: str, run_id: str) -> str:
    """The scratch database of a rehearsal: the target's name (shortened to fit), then the run id."""
    return f"{database[:40]}_rehearse_{run_id}"


def settings_on(settings: Settings, database: str) -> Settings:
    """The same settings, aimed at another database of the same server."""
    url = db.target_url(settings).set(database=database)
    return replace(settings, database_url=url.render_as_string(hide_password=False))


def make_copy(settings: Settings, name: str) -> RehearsalCopy:
    """Copy the target into ``name``: a template clone when nobody is connected to it, else its newest
    verified backup restored (refused when it has none)."""
    started = time.perf_counter()
    try:
        backup.clone(settings, name)
        return RehearsalCopy(name, "template clone", round(time.perf_counter() - started, 3))
    except PreconditionFailed as busy:
        if "already exists" in busy.message:
            raise
        newest = _newest_verified_backup(settings)
        if newest is None:
            raise PreconditionFailed(
                f"{busy.message}; and the target has no verified backup to restore instead: take one with "
                "`opslib backup` and `opslib verify-backup`, or rehearse when the database is idle"
            ) from None
    backup.restore(settings, newest, into=name)
    method = f"restore of {newest.name} (the target had other sessions)"
    return RehearsalCopy(name, method, round(time.perf_counter() - started, 3))


def _newest_verified_backup(settings: Settings) -> Path | None:
    target = db.target_url(settings).database
    found = [b for b in backup.list_backups(settings) if b.database == target and b.verified]
    return max(found, key=lambda b: b.started_at).path if found else None


def copies_of(settings: Settings, database: str) -> dict[str, str]:
    """The scratch copies of rehearsals of ``database`` on its server: run id → database name."""
    prefix = scratch_name(database, "")
    with db.connect_autocommit(db.maintenance_url(db.target_url(settings))) as admin:
        names = admin.execute(
            sa.text("SELECT datname FROM pg_database WHERE left(datname, length(:p)) = :p"), {"p": prefix}
        ).scalars()
        return {name[len(prefix):]: name for name in names}


def drop_copy(settings: Settings, name: str) -> bool:
    """Drop the scratch database ``name`` (its sessions ended first); True when there was one to drop."""
    with db.connect_autocommit(db.maintenance_url(db.target_url(settings))) as admin:
        if not db.database_exists(admin, name):
            return False
        admin.execute(sa.text(f"DROP DATABASE {db.quote_ident(admin, name)} WITH (FORCE)"))
        return True


# --- what a pass leaves --------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """A database's objects (kind and name → definition), row counts and per-column value digests."""

    objects: dict[str, str] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    columns: dict[str, str] = field(default_factory=dict)


def snapshot(conn: Connection, version_table: tuple[str | None, str]) -> Snapshot:
    """What a comparison needs of the database on ``conn``: every object, every table's row count, and a
    digest of each column's values paired with the row's key (order-independent)."""
    taken = Snapshot()
    taken.objects.update(schema.objects(conn, version_table))
    tables = [name.split(" ", 1)[1] for name, kind in taken.objects.items()
              if name.startswith("table ") and kind in ("r", "p")]
    for table in tables:
        taken.rows[table], digests = _table_digests(conn, table, taken.objects)
        taken.columns.update(digests)
    conn.rollback()
    return taken


def _table_digests(conn: Connection, table: str, objects: dict[str, str]) -> tuple[int, dict[str, str]]:
    quoted = db.quote_qualified(conn, table)
    columns = [k.split(" ", 1)[1].rsplit(".", 1)[1] for k in objects
               if k.startswith(f"column {table}.") and k.count(".") == table.count(".") + 1]
    key = _primary_key(conn, quoted)
    # Each value is digested with the row's key, so a value moved to another row counts as changed; a
    # table without a primary key is compared as a multiset of values.
    row_id = "(" + " || '|' || ".join(f"{db.quote_ident(conn, k)}::text" for k in key) + ")" if key else "''"
    parts = ["count(*)"] + [
        f"coalesce(sum(hashtextextended(coalesce({db.quote_ident(conn, c)}::text, '<null>') || '|' || {row_id}, 0)::numeric), 0)::text"
        for c in columns
    ]
    row = conn.execute(sa.text(f"SELECT {', '.join(parts)} FROM {quoted}")).one()
    return int(row[0]), {f"{table}.{c}": digest for c, digest in zip(columns, row[1:], strict=True)}


def _primary_key(conn: Connection, quoted: str) -> list[str]:
    rows = conn.execute(
        sa.text(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = to_regclass(:t) AND i.indisprimary ORDER BY a.attnum"
        ),
        {"t": quoted},
    )
    return [r[0] for r in rows]


def compare(first: Snapshot, second: Snapshot) -> Differences:
    """What ``second`` has that ``first`` had not, what it lost, and what changed, objects and data."""
    left = sorted(set(second.objects) - set(first.objects))
    lost = sorted(set(first.objects) - set(second.objects))
    changed = sorted(
        f"{k}: {first.objects[k]} → {second.objects[k]}"
        for k in set(first.objects) & set(second.objects)
        if first.objects[k] != second.objects[k]
    )
    data = []
    for table in sorted(set(first.rows) & set(second.rows)):
        a, b = first.rows[table], second.rows[table]
        if a != b:
            data.append(f"{table}: {a} rows before, {b} after ({'lost' if b < a else 'gained'} {abs(a - b)})")
    for column in sorted(set(first.columns) & set(second.columns)):
        if first.columns[column] != second.columns[column]:
            data.append(f"column {column}: its values differ from before")
    # A column dropped and added back by a downgrade is in both with other values: said above. One that
    # only the first had, in a table both have, lost its data with it.
    return Differences(tuple(left), tuple(lost), tuple(changed), tuple(data))


# What PostgreSQL says when a CREATE finds its object there: 'relation "x" already exists', 'column "c" of
# relation "t" already exists', 'constraint "k" for relation "t" already exists', 'function "f" already
# exists with same argument types'.
_ALREADY_EXISTS = re.compile(r'\b(\w+) "([^"]+)"(?: (?:of|for) relation "([^"]+)")? already exists')
# The kinds of a snapshot each word of those messages can be ("relation" is any of pg_class).
_KINDS = {
    "relation": ("table", "index", "sequence"),
    "type": ("type",),
    "function": ("function",),
    "extension": ("extension",),
    "column": ("column",),
    "constraint": ("constraint",),
    "trigger": ("trigger",),
}


def already_there(message: str, taken: Snapshot) -> tuple[str, ...]:
    """The objects of ``taken`` that a failed CREATE's ``message`` says already exist, as a snapshot
    names them ("table public.audit_log"); none when the message is not such a failure, or names an
    object ``taken`` has not (one the failing pass made itself)."""
    found = _ALREADY_EXISTS.search(message)
    if not found:
        return ()
    word, name, relation = found.groups()
    # The message names the object without its schema (it is the first of the search_path that has it).
    tail = f".{relation}.{name}" if relation else f".{name}"
    objects = []
    for key in taken.objects:
        kind, _, qualified = key.partition(" ")  # "function public.f(integer)", "extension extension.x"
        if kind in _KINDS.get(word, ()) and "." + qualified.split("(", 1)[0].split(".", 1)[1] == tail:
            objects.append(key)
    return tuple(sorted(objects))


@dataclass(frozen=True)
class RevisionPass:
    """One revision in one pass: how long it took, and the table locks its transaction held."""

    passage: str  # "upgrade", "downgrade", "upgrade again"
    revision: str
    seconds: float
    locks: tuple[db.RelationLock, ...] = ()

    @property
    def flagged(self) -> tuple[str, ...]:
        """The tables with rows it locked ACCESS EXCLUSIVE (no reads nor writes until it committed)."""
        return tuple(lock.table for lock in self.locks if lock.blocks_readers and lock.has_rows)

    def recorded(self) -> RehearsedRevision:
        """What the run's record keeps of it."""
        locks = tuple(LockHeld(lk.table, lk.mode, lk.has_rows) for lk in self.locks)
        return RehearsedRevision(self.passage, self.revision, self.seconds, locks, self.flagged)


class PassRecorder:
    """Collects one pass's revisions: ``on_step`` and ``on_locks`` of :func:`opslib.migrate.upgrade`."""

    def __init__(self, passage: str):
        self.passage = passage
        self.locks: dict[str, tuple[db.RelationLock, ...]] = {}
        self.revisions: list[RevisionPass] = []

    def on_locks(self, revision: str, locks: list[db.RelationLock]) -> None:
        """Keep the locks a revision's transaction held."""
        self.locks[revision] = tuple(locks)

    def on_step(self, info, seconds: float, started: float) -> None:
        """Keep a committed revision's time, with its locks."""
        self.revisions.append(
            RevisionPass(self.passage, info.revision, round(seconds, 4), self.locks.get(info.revision, ()))
        )
