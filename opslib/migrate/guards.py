"""What keeps a change safe while it runs: the invalid-index guard, and the lock timeout with its retries.

A migration statement waits for its locks no longer than ``ddl_lock_timeout_s``; a command that hits
that timeout is run again with backoff (each revision commits on its own, so it resumes at the
revision that timed out). A revision that leaves an invalid index is not recorded as applied, and
is retried the same way once the index is dropped.
"""

from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from alembic.script import Script, ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from opslib import db
from opslib.config import Settings
from opslib.errors import Interrupted, OpsError
from opslib.migrate.results import AttemptCallback
from opslib.signals import signals_noted

# Only some revisions can leave an invalid index: one that ran any statement in autocommit mode (a
# concurrent build or drop must), one that says so (CREATE INDEX / REINDEX / DROP INDEX CONCURRENTLY,
# postgresql_concurrently=True, an index ON ONLY a partitioned table), or any index statement while
# the database already holds an invalid index (IF NOT EXISTS skips it). What a revision says is its
# source and the statements it ran, so that SQL built by a helper counts. A transactional CREATE
# INDEX that fails rolls back whole. Other revisions are not checked one by one, which keeps long
# chains free of a query per revision.
_ON_ONLY = re.compile(r"\bon\s+only\b")


def _may_leave_invalid(source: str) -> bool:
    """Whether a revision's lower-cased source says something that can leave an invalid index by itself."""
    return "concurrent" in source or ("only" in source and _ON_ONLY.search(source) is not None)


class _InvalidIndexLeft(OpsError):
    """A revision ran to its end but an index it built (or skipped with IF NOT EXISTS) is invalid.

    Raised from ``on_version_apply``, inside the revision's last transaction, so the version row
    written there is rolled back with it; retried like a lock timeout, the invalid index dropped first.
    """

    def __init__(self, revision: str, indexes: Sequence[db.InvalidIndex]):
        names = ", ".join(i.name for i in indexes)
        super().__init__(
            f"index {names} is INVALID (pg_index.indisvalid is false) after revision {revision} ran, "
            "so the revision is not recorded as applied"
        )
        self.revision = revision
        self.indexes = tuple(indexes)


class _IndexGuard:
    """Keeps a change from recording a revision whose index build left an invalid index.

    ``pg_index.indisvalid`` is read when the command starts (those are not this run's doing), after
    each revision that can leave an invalid index (see ``_may_leave_invalid``; before its version row
    commits), and when the command ends. A culprit is an invalid index that is new since the start,
    or that the revision names (an ``IF NOT EXISTS`` that skipped an invalid index of that name); an
    index another session is building right now is not one. Before a retry, culprits are dropped
    (``DROP INDEX CONCURRENTLY``) so that the revision builds them again.
    """

    def __init__(self, script: ScriptDirectory, conn: Connection, action: str, steps: Sequence[Script] = ()):
        self.script = script
        self.action = action
        self.steps = steps  # the planned revisions, whose sources are read together when the command starts
        self.conn = conn  # opslib's own session (env.py may run the revisions on another)
        self.before: set[int] = set()  # invalid when the command started
        self.flagged: set[int] = set()  # pre-existing ones a revision of this run named, still invalid
        self._sources: dict[str, str] = {}
        # The statements run since the last revision ended (lower-cased), and whether any ran in
        # autocommit mode: filled by a listener on every engine while the command runs.
        self._ran: list[str] = []
        self._autocommit = False
        self._reading = False  # the guard's own reads are not the revision's statements
        self._listening = False

    def source(self, revision: str, path: str | None = None) -> str:
        """The text of a revision's file, lower-cased (read once per command); empty if it cannot be read."""
        if revision not in self._sources:
            try:
                with open(path or self.script.get_revision(revision).path, "rb") as file:
                    self._sources[revision] = file.read().decode("utf-8", "replace").lower()
            except (OSError, RevisionError, CommandError, AttributeError, TypeError):
                self._sources[revision] = ""
        return self._sources[revision]

    def _read(self) -> list[db.InvalidIndex]:
        """Invalid indexes now, read on opslib's session outside any transaction."""
        self._reading = True
        try:
            if self.conn.in_transaction():
                self.conn.rollback()  # between attempts nothing is pending on it: this only ends the read's
            found = db.invalid_indexes(self.conn)
            if self.conn.in_transaction():
                self.conn.commit()
            return found
        finally:
            self._reading = False

    def start(self) -> None:
        """Note the invalid indexes already there, and begin noting the statements revisions run."""
        self.before = {i.oid for i in self._read()}
        for step in self.steps:  # in one go, not one file between two revisions' transactions
            self.source(step.revision, step.path)
        if not self._listening:
            # On the Engine class: env.py may run the revisions on an engine of its own.
            sa.event.listen(sa.engine.Engine, "before_cursor_execute", self._note_statement)
            self._listening = True

    def stop(self) -> None:
        """Stop noting statements (the listener is global to the process)."""
        if self._listening:
            sa.event.remove(sa.engine.Engine, "before_cursor_execute", self._note_statement)
            self._listening = False

    def _note_statement(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if self._reading:
            return
        self._ran.append(statement.lower() if isinstance(statement, str) else "")
        if not self._autocommit:
            level = conn.get_execution_options().get("isolation_level")
            dbapi = getattr(cursor, "connection", None)
            self._autocommit = level == "AUTOCOMMIT" or getattr(dbapi, "autocommit", False) is True

    def ran_autocommit(self) -> bool:
        """Whether the revision under way when the command stopped ran a statement in autocommit mode
        (committed at once, whatever became of the revision)."""
        return self._autocommit

    def _take_statements(self) -> tuple[str, bool]:
        """What the revision that just ended ran (its statements' text, and whether any was autocommit)."""
        ran, autocommit = "\n".join(self._ran), self._autocommit
        self._ran, self._autocommit = [], False
        return ran, autocommit

    def _culprits(self, found: Sequence[db.InvalidIndex], text: str = "") -> list[db.InvalidIndex]:
        return [
            i
            for i in found
            if i.building_pid is None
            and (
                i.oid not in self.before
                or i.oid in self.flagged
                or (text and re.search(rf"(?<![\w$]){re.escape(i.relname.lower())}(?![\w$])", text))
            )
        ]

    def check(self, connection: Connection, step) -> None:
        """From ``on_version_apply``, in the revision's transaction: raise if it left an invalid index."""
        if getattr(step, "is_stamp", False):
            return
        revision = step.up_revision_id
        ran, autocommit = self._take_statements()
        text = f"{self.source(revision)}\n{ran}"
        if not autocommit:
            if "index" not in text:
                return
            if not (self.before or self.flagged) and not _may_leave_invalid(text):
                return
        self._reading = True
        try:
            left = self._culprits(db.invalid_indexes(connection), text)
        finally:
            self._reading = False
        if left:
            self.flagged.update(i.oid for i in left)
            raise _InvalidIndexLeft(revision, left)

    def leftovers(self) -> list[db.InvalidIndex]:
        """This run's culprits still invalid now; an empty list when they cannot be read."""
        try:
            return self._culprits(self._read())
        except SQLAlchemyError:  # the session is gone: the failure is told without them
            return []

    def drop_leftovers(self, dropping: list[str]) -> None:
        """``DROP INDEX CONCURRENTLY`` each leftover, outside a transaction, under the lock timeout; the
        name being dropped is kept in ``dropping`` for the caller's message if the drop times out."""
        for index in self.leftovers():
            dropping[:] = [index.name]
            self._reading = True
            try:
                db.drop_index_concurrently(self.conn, index.name)
            finally:
                self._reading = False
            self.flagged.discard(index.oid)
        dropping.clear()
        self._take_statements()  # the next attempt's first revision starts afresh

    def drop_after_interrupt(self, settings: Settings) -> str:
        """After a signal stopped the command: drop what the run left invalid (a cancelled concurrent
        build), under the lock timeout, and say what was done, for the run's record. Further signals
        wait until it is over; a drop that fails leaves the index named with the statement to run."""
        self.stop()
        left = self.leftovers()
        if not left:
            return ""
        dropped: list[str] = []
        with signals_noted():
            try:
                with _ddl_lock_timeout(self.conn, settings.ddl_lock_timeout_s):
                    for index in left:
                        db.drop_index_concurrently(self.conn, index.name)
                        dropped.append(index.name)
            except (SQLAlchemyError, OpsError) as err:
                rest = [i.name for i in left if i.name not in dropped]
                done = f"dropped index {', '.join(dropped)} the interrupted build left INVALID; " if dropped else ""
                return (
                    f"; {done}index {', '.join(rest)} is INVALID ({db.driver_message(err) if isinstance(err, DBAPIError) else err}): "
                    f"drop it with DROP INDEX CONCURRENTLY {rest[0]}"
                )
        return f"; index {', '.join(dropped)}, left INVALID by the interrupted build, was dropped (DROP INDEX CONCURRENTLY)"

    def after_command(self) -> None:
        """At the end of a command that succeeded: an invalid index new since its start fails it."""
        left = self.leftovers()
        if left:
            names = ", ".join(i.name for i in left)
            raise OpsError(
                f"index {names} became INVALID during this {self.action}, built by a revision whose own text "
                f"does not say CONCURRENTLY (through a helper?); drop it with DROP INDEX CONCURRENTLY "
                f"{left[0].name} and run that revision again, or REINDEX INDEX CONCURRENTLY {left[0].name}"
            )

    def kept_note(self, revision: str) -> str:
        """What stays of a revision that failed after its autocommit block committed part of it."""
        if "autocommit_block" not in self.source(revision):
            return ""
        return " (the version row is not advanced; what it ran in or before its autocommit_block stays committed)"

    def final_message(self, what: str, attempts: int, err: BaseException, settings: Settings) -> str | None:
        """The failure of the last attempt, when it leaves an invalid index: the index, the revision, the way out."""
        left = self.leftovers()
        if not left:
            return None
        names = ", ".join(i.name for i in left)
        tables = ", ".join(dict.fromkeys(i.table for i in left))
        revision = what.partition(" ")[2]
        if isinstance(err, _InvalidIndexLeft):
            why = f"it is still invalid after {attempts} attempt(s)"
        else:
            why = (
                f"its concurrent build could not get its locks within lock_timeout "
                f"{settings.ddl_lock_timeout_s:g} s in {attempts} attempts: another session holds a lock on "
                f"{tables} or an old snapshot (see `opslib check`)"
            )
        return (
            f"revision {revision} left index {names} INVALID: {why}; it is not recorded as applied"
            f"{self.kept_note(revision)}; "
            f"drop the index with DROP INDEX CONCURRENTLY {left[0].name} before running the revision again"
        )


@contextmanager
def _ddl_lock_timeout(conn: Connection, seconds: float) -> Iterator[None]:
    """Every migration statement gives up waiting for a lock after ``seconds`` instead of queueing.

    A DDL statement queued behind a long transaction makes every later query on the table queue
    behind it; a short lock_timeout turns that stall into a clean, retried failure. It is set on the
    connection handed to env.py, and through PGOPTIONS (which libpq reads) on any connection env.py
    opens itself.
    """
    ms = max(int(seconds * 1000), 1)
    conn.execute(sa.text("SELECT set_config('lock_timeout', :v, false)"), {"v": f"{ms}ms"})
    conn.commit()
    saved = os.environ.get("PGOPTIONS")
    os.environ["PGOPTIONS"] = f"{saved or ''} -c lock_timeout={ms}ms".strip()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PGOPTIONS", None)
        else:
            os.environ["PGOPTIONS"] = saved
        try:
            if conn.in_transaction():
                conn.rollback()
            conn.execute(sa.text("RESET lock_timeout"))
            conn.commit()
        except DBAPIError:
            pass


def _retrying(
    settings: Settings,
    action: Callable[[], None],
    after_timeout: Callable[[], str],
    on_attempt: AttemptCallback | None,
    guard: _IndexGuard | None = None,
    late: Sequence[int] = (),
) -> None:
    """Run the Alembic command; when it hits the lock timeout, run it again with backoff.

    Each revision commits on its own, so the command run again resumes at the revision that timed
    out. The waits double from the lock timeout itself (2 s, 4 s, 8 s at the default), so a blocker
    gets time to finish while traffic on the table is never held up for longer than one lock timeout.

    With ``guard``, a revision that leaves an invalid index (a ``CREATE INDEX CONCURRENTLY`` the lock
    timeout cancelled, or one an ``IF NOT EXISTS`` skipped) is retried too: before the next attempt
    the invalid index is dropped with ``DROP INDEX CONCURRENTLY`` (itself under the lock timeout, a
    drop that times out counting as an attempt), so the revision builds it again. After the last
    attempt the failure names the invalid index and the revision, which is not recorded as applied.
    """
    attempts = settings.ddl_retries + 1
    if guard is not None:
        guard.start()
    try:
        _attempts(settings, action, after_timeout, on_attempt, guard, attempts, late)
    finally:
        if guard is not None:
            guard.stop()


def _attempts(settings, action, after_timeout, on_attempt, guard, attempts, late) -> None:
    """The loop of :func:`_retrying`, while its guard notes the statements run; a signal noted in
    ``late`` (outside the work itself) ends it between attempts."""
    for attempt in range(1, attempts + 1):
        dropping: list[str] = []
        if late:
            raise Interrupted(late[0])
        try:
            if guard is not None and attempt > 1:
                guard.drop_leftovers(dropping)
            if late:  # noted while the leftovers were dropped or the attempt was recorded
                raise Interrupted(late[0])
            action()
            if guard is not None:
                guard.after_command()
            return
        except (DBAPIError, _InvalidIndexLeft) as err:
            if isinstance(err, DBAPIError) and not db.is_lock_timeout(err):
                left = guard.leftovers() if guard is not None else []
                if left:  # a build that failed otherwise (a duplicate in a unique index, say) left it
                    raise OpsError(
                        f"{type(getattr(err, 'orig', None) or err).__name__}: {db.driver_message(err)}; "
                        f"it left index {', '.join(i.name for i in left)} INVALID"
                        f"{guard.kept_note(after_timeout().partition(' ')[2])}: drop it with "
                        f"DROP INDEX CONCURRENTLY {left[0].name} before running the revision again"
                    ) from err
                raise
            what = after_timeout()
            if isinstance(err, _InvalidIndexLeft):
                why = err.message
            elif dropping:
                why = f"DROP INDEX CONCURRENTLY {dropping[0]}: {db.driver_message(err)}"
            else:
                why = db.driver_message(err)
            if on_attempt is not None:
                on_attempt(what, attempt, why)
            if attempt == attempts:
                message = guard.final_message(what, attempts, err, settings) if guard is not None else None
                if message is None and isinstance(err, _InvalidIndexLeft):
                    message = f"{what}: {err.message}"
                if message is not None:
                    raise OpsError(message) from err
                raise OpsError(
                    f"{what} could not get its locks within lock_timeout {settings.ddl_lock_timeout_s:g} s in "
                    f"{attempts} attempts: another session holds a lock on the table (see `opslib check`)"
                ) from err
            resume = time.monotonic() + min(settings.ddl_lock_timeout_s * 2 ** (attempt - 1), 30)
            while not late and time.monotonic() < resume:  # a signal ends the wait
                time.sleep(0.05)
