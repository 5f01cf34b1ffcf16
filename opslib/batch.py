"""Batched data migrations: one set-based UPDATE per primary-key range, each committed on its own.

The guide's pattern (``LIMIT … OFFSET`` and one UPDATE per row) re-reads every earlier row for each
batch, so its cost grows with the square of the table; one UPDATE of the whole table is fast but holds
every row lock, and its transaction, until the last row. :func:`update_in_batches` walks the table by
explicit key bounds (``WHERE id > a AND id <= b``: an index range scan, never OFFSET), commits each
range, and keeps its progress in ``opslib.batch_progress`` in the same transaction as the range's rows,
so an interrupted run resumes after the last committed range and never redoes one.

From a revision, in one call::

    from opslib.batch import update_in_batches

    def upgrade():
        update_in_batches("products", "normalized_price = CAST(price AS NUMERIC)", where="price ~ '^[0-9]+$'")

Inside Alembic the batches run in the migration's ``autocommit_block``: what the revision did before
the call is committed first, and the rest of the revision runs in a new transaction after it. Make the
steps before it repeatable (``ADD COLUMN IF NOT EXISTS``), so that a run stopped in the middle can be
run again. With ``--sql`` (offline) the call renders as one plain UPDATE, which is what the lint reads.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TextIO

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from opslib import db
from opslib.errors import InvalidInput, MigrationFailed
from opslib.history import SCHEMA_LOCK_KEY

DEFAULT_BATCH_ROWS = 10_000
DEFAULT_LOCK_TIMEOUT_S = 2.0
DEFAULT_RETRIES = 3

PROGRESS_DDL = (
    "CREATE SCHEMA IF NOT EXISTS opslib",
    """CREATE TABLE IF NOT EXISTS opslib.batch_progress (
        name text PRIMARY KEY,
        statement_sha256 text NOT NULL,
        table_name text NOT NULL,
        last_key bigint,
        rows_done bigint NOT NULL DEFAULT 0,
        batches_done integer NOT NULL DEFAULT 0,
        started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        finished_at timestamptz
    )""",
)

# Where the progress bar goes while opslib collects what revisions print (see opslib.migrate): the
# terminal's or the notebook's stdout as it was before the collection began. Never stderr: a notebook
# shows stderr on a red background, as an error, and a progress bar is not one.
_progress_stream: TextIO | None = None


def set_progress_stream(stream: TextIO | None) -> TextIO | None:
    """Send progress bars to ``stream`` (None: to ``sys.stdout``); returns the stream it replaces."""
    global _progress_stream
    previous, _progress_stream = _progress_stream, stream
    return previous


def progress_stream() -> TextIO:
    """Where progress bars go now."""
    return _progress_stream or sys.stdout


@dataclass(frozen=True)
class BatchResult:
    """What one call of :func:`update_in_batches` did."""

    name: str
    table: str
    rows: int  # rows updated by this call
    batches: int  # key ranges committed by this call
    resumed_after: int | None  # the last key of an earlier, interrupted call; None when it started afresh
    rows_before: int  # rows the interrupted call had already updated (not redone)
    seconds: float
    longest_batch_s: float  # the longest time one range held its row locks (its statement)
    lock_retries: int

    @property
    def rows_per_s(self) -> float:
        """Rows updated per second by this call."""
        return round(self.rows / self.seconds, 1) if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {**asdict(self), "rows_per_s": self.rows_per_s}

    def __str__(self) -> str:
        resumed = (
            f", resumed after key {self.resumed_after} (already done: {self.rows_before} rows)"
            if self.resumed_after is not None
            else ""
        )
        return (
            f"{self.name}: {self.rows} rows of {self.table} in {self.batches} batches, {self.seconds:.2f} s "
            f"({self.rows_per_s:.0f} rows/s, longest batch {self.longest_batch_s:.3f} s){resumed}"
        )



class BatchFailed(MigrationFailed):
    """A batch could not be applied; the batches before it stay committed, and a new run resumes after them."""


def statement_text(table: str, set_sql: str, where: str | None) -> str:
    """The set-based UPDATE a batched update stands for (what ``--sql`` shows and the lint reads)."""
    condition = f" WHERE {where}" if where else ""
    return f"UPDATE {table} SET {set_sql}{condition}"


def update_in_batches(
    table: str,
    set_sql: str,
    *,
    where: str | None = None,
    name: str | None = None,
    key: str = "id",
    batch_rows: int = DEFAULT_BATCH_ROWS,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    pause_s: float = 0.0,
    retries: int = DEFAULT_RETRIES,
    progress: bool = True,
    connection: Connection | None = None,
) -> BatchResult | None:
    """``UPDATE table SET set_sql WHERE where``, range by range of the integer key ``key``, each range
    committed on its own with a lock timeout of ``lock_timeout_s`` (retried ``retries`` times, then
    :class:`BatchFailed`), ``pause_s`` seconds between ranges, and a progress bar.

    ``name`` identifies the work for resuming (default: the table and statement); a run stopped part-way
    resumes after its last committed range when called again with the same statement. Without
    ``connection`` it must be called from an Alembic revision; with one, that connection must not be
    inside a transaction. Returns None when rendering SQL offline (``--sql``).
    """
    if batch_rows < 1:
        raise InvalidInput(f"batch_rows must be at least 1, not {batch_rows}")
    if lock_timeout_s <= 0:
        raise InvalidInput(f"lock_timeout_s must be positive, not {lock_timeout_s}")
    statement = statement_text(table, set_sql, where)
    sha = hashlib.sha256(f"{statement}\nkey {key}".encode()).hexdigest()
    name = name or f"{table}: {sha[:12]}"
    if connection is not None:
        return _run(connection, table, set_sql, where, key, name, sha, batch_rows, lock_timeout_s, pause_s,
                    retries, progress)
    from alembic import op  # noqa: PLC0415 -- only inside a revision, where Alembic is running

    context = op.get_context()
    if context.as_sql:
        # Offline: no rows to walk. The lint and `opslib sql` see the statement this work amounts to.
        op.execute(f"-- opslib.batch: {name}, in ranges of {key} of about {batch_rows} rows, each committed")
        op.execute(statement)
        return None
    with context.autocommit_block():
        result = _run(op.get_bind(), table, set_sql, where, key, name, sha, batch_rows, lock_timeout_s,
                      pause_s, retries, progress)
    # As a revision's own print: it joins the migration's output (`opslib -v`, the runbook's section, the record).
    print(result)
    return result


def forget(name: str, *, connection: Connection | None = None) -> None:
    """Drop the progress kept under ``name`` (call it from the downgrade that undoes the batched
    update, so that a later upgrade starts from the first row, not after an old run's last range)."""
    from alembic import op  # noqa: PLC0415

    conn = connection if connection is not None else op.get_bind()
    if connection is None and op.get_context().as_sql:
        op.execute(f"DELETE FROM opslib.batch_progress WHERE name = '{name.replace(chr(39), chr(39) * 2)}'")
        return
    if conn.execute(sa.text("SELECT to_regclass('opslib.batch_progress') IS NOT NULL")).scalar():
        conn.execute(sa.text("DELETE FROM opslib.batch_progress WHERE name = :name"), {"name": name})


def progress_of(conn: Connection, name: str) -> dict | None:
    """The kept progress of batched update ``name`` (last_key, rows_done, batches_done, finished_at…)."""
    if not conn.execute(sa.text("SELECT to_regclass('opslib.batch_progress') IS NOT NULL")).scalar():
        return None
    row = conn.execute(sa.text("SELECT * FROM opslib.batch_progress WHERE name = :n"), {"n": name}).first()
    return dict(row._mapping) if row is not None else None


@contextmanager
def _autocommit(conn: Connection) -> Iterator[Connection]:
    """``conn`` with each statement committed on its own (Alembic's autocommit block already is)."""
    if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        yield conn
        return
    if conn.in_transaction():
        raise InvalidInput("update_in_batches needs a connection outside a transaction: commit first")
    try:
        yield conn.execution_options(isolation_level="AUTOCOMMIT")
    finally:
        # The caller's connection goes back as it came: its later statements in transactions again (the
        # commit ends only SQLAlchemy's own bookkeeping: every statement here has committed already).
        if conn.in_transaction():
            conn.commit()
        conn.execution_options(isolation_level=conn.default_isolation_level)


@contextmanager
def _session_lock_timeout(conn: Connection, seconds: float) -> Iterator[None]:
    previous = conn.execute(sa.text("SELECT current_setting('lock_timeout')")).scalar()
    conn.execute(sa.text("SELECT set_config('lock_timeout', :v, false)"), {"v": f"{int(seconds * 1000)}ms"})
    try:
        yield
    finally:
        try:
            conn.execute(sa.text("SELECT set_config('lock_timeout', :v, false)"), {"v": previous})
        except DBAPIError:
            pass  # the session is gone (the run was stopped): nothing to restore


def _ensure_progress_table(conn: Connection) -> None:
    if conn.execute(sa.text("SELECT to_regclass('opslib.batch_progress') IS NOT NULL")).scalar():
        return
    # The schema may be created at the same moment by the run's history (opslib.history): the same
    # lock serializes both. A session lock here, as each statement commits on its own.
    conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": SCHEMA_LOCK_KEY})
    try:
        for ddl in PROGRESS_DDL:
            conn.execute(sa.text(ddl))
    finally:
        conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": SCHEMA_LOCK_KEY})


def _start(conn: Connection, name: str, sha: str, table: str) -> dict:
    """The progress row to continue: the unfinished one of the same statement, or a fresh one."""
    kept = progress_of(conn, name)
    if kept is not None and kept["finished_at"] is None and kept["statement_sha256"] == sha:
        return kept
    conn.execute(
        sa.text(
            "INSERT INTO opslib.batch_progress (name, statement_sha256, table_name) VALUES (:n, :s, :t) "
            "ON CONFLICT (name) DO UPDATE SET statement_sha256 = :s, table_name = :t, last_key = NULL, "
            "rows_done = 0, batches_done = 0, started_at = clock_timestamp(), updated_at = clock_timestamp(), "
            "finished_at = NULL"
        ),
        {"n": name, "s": sha, "t": table},
    )
    return progress_of(conn, name)


def _key_span(conn: Connection, table_sql: str, key_sql: str, regclass: str) -> tuple[int | None, int | None, float]:
    low, high = conn.execute(sa.text(f"SELECT min({key_sql}), max({key_sql}) FROM {table_sql}")).one()
    if low is not None and not isinstance(low, int):
        raise InvalidInput(f"update_in_batches walks an integer key: {key_sql} of {table_sql} is {type(low).__name__}")
    estimate = conn.execute(
        sa.text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:t)"), {"t": regclass}
    ).scalar()
    return low, high, float(estimate or 0)


def _step(low: int, high: int, estimate: float, batch_rows: int) -> int:
    """Key width of one range: ``batch_rows`` rows at the table's density (dense keys when unknown)."""
    span = high - low + 1
    rows = estimate if estimate > 0 else span
    return max(1, int(batch_rows * span / max(rows, 1.0)))


def _is_lock_timeout(err: DBAPIError) -> bool:
    return getattr(err.orig, "pgcode", None) == "55P03" or "lock timeout" in str(err.orig)


def _run(conn, table, set_sql, where, key, name, sha, batch_rows, lock_timeout_s, pause_s, retries, progress):
    started = time.perf_counter()
    with _autocommit(conn) as conn:
        table_sql = db.quote_qualified(conn, table)
        key_sql = db.quote_ident(conn, key)
        _ensure_progress_table(conn)
        kept = _start(conn, name, sha, table)
        resumed_after = kept["last_key"]
        rows_before = kept["rows_done"] if resumed_after is not None else 0
        low, high, estimate = _key_span(conn, table_sql, key_sql, table)
        apply = _range_statements(table_sql, key_sql, set_sql, where)
        ranges = _Ranges(conn, apply, name, table, table_sql, key_sql, rows_before, retries, lock_timeout_s,
                         pause_s)
        if low is not None:
            step = _step(low, high, estimate, batch_rows)
            position = resumed_after if resumed_after is not None else low - 1
            bar = _bar(progress, name, position, high, step)
            try:
                with _session_lock_timeout(conn, lock_timeout_s):
                    ranges.walk(position, high, step, bar)
            finally:
                if bar is not None:
                    bar.close()
        _mark_finished(conn, name)
    result = BatchResult(
        name=name,
        table=table,
        rows=ranges.rows,
        batches=ranges.batches,
        resumed_after=resumed_after,
        rows_before=rows_before,
        seconds=round(time.perf_counter() - started, 3),
        longest_batch_s=round(ranges.longest, 4),
        lock_retries=ranges.lock_retries,
    )
    logging.getLogger(__name__).info("%s", result)
    return result


def _range_statements(
    table_sql: str, key_sql: str, set_sql: str, where: str | None
) -> tuple[sa.TextClause, sa.TextClause]:
    """The two statements of one key range: its rows' UPDATE, and its progress's."""
    condition = f" AND ({where})" if where else ""
    # Two statements in one transaction: the range's rows and its progress commit together (a resumed
    # run never redoes a range), without an UPDATE … RETURNING collecting every row to count them.
    return (
        sa.text(f"UPDATE {table_sql} SET {set_sql} WHERE {key_sql} > :lo AND {key_sql} <= :hi{condition}"),
        sa.text(
            "UPDATE opslib.batch_progress SET last_key = :hi, rows_done = rows_done + :n, "
            "batches_done = batches_done + 1, updated_at = clock_timestamp() WHERE name = :name"
        ),
    )


@dataclass
class _Ranges:
    """The key ranges of one call, updated in order, and what they did: rows, ranges, lock retries, and the
    longest time one range held its row locks."""

    conn: Connection
    apply: tuple[sa.TextClause, sa.TextClause]  # see _range_statements
    name: str
    table: str
    table_sql: str
    key_sql: str
    rows_before: int  # rows an interrupted call had already updated, for the bar
    retries: int
    lock_timeout_s: float
    pause_s: float
    rows: int = 0
    batches: int = 0
    lock_retries: int = 0
    longest: float = 0.0

    def walk(self, position: int, high: int, step: int, bar) -> None:
        """Update the ranges of ``step`` keys after ``position`` up to ``high``, one transaction each, and on
        to the key's maximum as read again when ``high`` is reached; ``bar``, when shown, counts them."""
        while position < high:
            upper = min(position + step, high)
            self._update(position, upper)
            position = upper
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{self.rows_before + self.rows:,} rows", refresh=False)
            if position >= high:
                # Rows added above the first maximum while it ran are covered too.
                high = self.conn.execute(sa.text(f"SELECT max({self.key_sql}) FROM {self.table_sql}")).scalar()
                if bar is not None and high > position:
                    bar.total = bar.n + -(-(high - position) // step)
            if self.pause_s and position < high:
                time.sleep(self.pause_s)

    def _update(self, low: int, high: int) -> None:
        """Update the range of keys > ``low`` and <= ``high`` (see :func:`_apply_range`), and count it."""
        n, seconds, tries = _apply_range(self.conn, self.apply, self.name, low, high, self.retries,
                                         self.lock_timeout_s, self.table)
        self.rows += n
        self.batches += 1
        self.lock_retries += tries
        self.longest = max(self.longest, seconds)


def _mark_finished(conn: Connection, name: str) -> None:
    """Note in ``name``'s progress that its last range is done: a later call starts afresh."""
    conn.execute(
        sa.text("UPDATE opslib.batch_progress SET finished_at = clock_timestamp() WHERE name = :n"),
        {"n": name},
    )


def _apply_range(conn, apply, name, low, high, retries, lock_timeout_s, table) -> tuple[int, float, int]:
    """Update the rows of one key range and its progress in one transaction; retry a lock timeout.
    Returns the rows updated, how long the transaction held its row locks, and the retries it took."""
    rows_sql, progress_sql = apply
    for attempt in range(retries + 1):
        began = time.perf_counter()
        try:
            conn.exec_driver_sql("BEGIN")  # the connection commits each statement on its own otherwise
            n = conn.execute(rows_sql, {"lo": low, "hi": high}).rowcount
            conn.execute(progress_sql, {"hi": high, "n": n, "name": name})
            conn.exec_driver_sql("COMMIT")
            return int(n or 0), time.perf_counter() - began, attempt
        except DBAPIError as err:
            try:
                conn.exec_driver_sql("ROLLBACK")
            except DBAPIError:
                pass  # the session is gone: the error below says what happened
            if not _is_lock_timeout(err) or attempt == retries:
                raise BatchFailed(_failure(name, table, low, high, err, lock_timeout_s, attempt), changed=True) from err
            time.sleep(min(0.2 * 2**attempt, 2.0))  # let the blocking transaction finish
    raise AssertionError("unreachable")


def _failure(name, table, low, high, err, lock_timeout_s, attempt) -> str:
    if _is_lock_timeout(err):
        cause = f"rows could not be locked within {lock_timeout_s:g} s, {attempt + 1} tries (another transaction holds them)"
    else:
        cause = str(getattr(err, "orig", err)).strip().splitlines()[0]
    return (
        f"batched update {name!r} failed on {table} keys > {low} and <= {high}: {cause}; "
        f"the ranges up to key {low} are committed, and running it again resumes there"
    )


def _bar(progress: bool, name: str, position: int, high: int, step: int):
    if not progress:
        return None
    from tqdm import tqdm  # noqa: PLC0415 -- only when a bar is shown

    total = -(-(high - position) // step) if high > position else 0
    # At most about one refresh a second: a notebook keeps every refresh in its output.
    return tqdm(total=total, desc=name, unit="batch", file=progress_stream(), mininterval=1.0,
                leave=True, dynamic_ncols=False, ncols=100)


def require_filled(table: str, column: str, *, show: tuple[str, ...] = ("id",), limit: int = 5,
                   connection: Connection | None = None) -> None:
    """Raise :class:`BatchFailed` naming the rows whose ``column`` is still NULL (up to ``limit`` of them,
    with their ``show`` columns): what a batched conversion could not convert, before a NOT NULL."""
    from alembic import op  # noqa: PLC0415

    if connection is None and op.get_context().as_sql:
        return
    conn = connection if connection is not None else op.get_bind()
    table_sql = db.quote_qualified(conn, table)
    columns = ", ".join(db.quote_ident(conn, c) for c in show)
    col = db.quote_ident(conn, column)
    count = conn.execute(sa.text(f"SELECT count(*) FROM {table_sql} WHERE {col} IS NULL")).scalar()
    if not count:
        return
    rows = conn.execute(
        sa.text(f"SELECT {columns} FROM {table_sql} WHERE {col} IS NULL ORDER BY 1 LIMIT :n"), {"n": limit}
    ).all()
    shown = "; ".join(", ".join(f"{c}={v!r}" for c, v in zip(show, row, strict=True)) for row in rows)
    more = f" and {count - len(rows)} more" if count > len(rows) else ""
    raise BatchFailed(f"{count} rows of {table} have no {column}: {shown}{more}; fix them, then upgrade again",
                      changed=True)
