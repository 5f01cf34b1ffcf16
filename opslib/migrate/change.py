"""One change to the database (upgrade, downgrade, stamp): under the lock, guarded, retried, and told.

A changing verb runs as one Alembic command on opslib's session, which holds the opslib advisory
lock; that session is handed to the project's ``env.py`` through ``config.attributes["connection"]``
(an env.py that opens its own connection from ``sqlalchemy.url`` gets the same URL, in memory only).
Errors from Alembic and the driver are turned into :mod:`opslib.errors` here, each saying where the
database now stands.
"""

from __future__ import annotations

import io
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from alembic.script import Script, ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from opslib import db
from opslib import history as db_history
from opslib.errors import ConfigError, Interrupted, InvalidInput, MigrationFailed, OpsError
from opslib.migrate.guards import _ddl_lock_timeout, _IndexGuard, _retrying
from opslib.migrate.project import alembic_config, table_name
from opslib.migrate.results import AttemptCallback, LocksCallback, MigrationResult, StepCallback
from opslib.migrate.revisions import _applied_set, _between, _describe, _info, _pending
from opslib.migrate.runtime import _Canceller, _capture_alembic_output, _Progress, _run_env, check_same_database
from opslib.migrate.target import Target
from opslib.migrate.versiontable import current_revisions
from opslib.signals import signals_noted


@contextmanager
def _locked_connection(target: Target) -> Iterator[tuple[URL, Connection]]:
    """opslib's own session to the target, holding the opslib advisory lock while it is open."""
    url = target.url
    with db.connect(url) as conn:
        with db.advisory_lock(conn, target.settings.lock_timeout_s):
            yield url, conn


def _run_change(
    target_: Target,
    action: str,
    target: str,
    x_args: Sequence[str],
    plan: Callable[[ScriptDirectory, tuple[str, ...]], list[Script]],
    destination: Callable[[ScriptDirectory, tuple[str, ...], list[Script]], object],
    on_step: StepCallback | None = None,
    on_attempt: AttemptCallback | None = None,
    on_locks: LocksCallback | None = None,
) -> MigrationResult:
    """Run one changing verb under the lock, in one Alembic command, and report before/after, or
    raise saying where the database stands.

    ``plan(script, current)`` validates the request and returns the revisions it will pass through
    (raising before any change); ``destination(script, current, steps)`` is the target handed to Alembic,
    absolute where it can be, so
    that a retry after a lock timeout resumes at the revision that timed out.
    """
    # The project is loaded first: a revision file that cannot be read is configuration (exit 2), said before
    # any connection or lock.
    target_.project  # noqa: B018 -- loaded for what loading it raises
    finished: list = []  # the database and its revisions, once the change is done
    try:
        with _locked_connection(target_) as (url, conn):
            change = _Change(target_, action, target, url, conn)
            change.read_and_plan(x_args, plan, destination, on_step, on_locks)
            after = change.run(on_attempt, finished)
    except KeyboardInterrupt as err:  # a signal while the lock was given up and the session closed, after the work
        if not finished or getattr(err, "revisions", None) is not None:
            raise
        raise _finished_before(getattr(err, "signum", signal.SIGINT), action, target, *finished) from None
    return change.result(after)


class _Change:
    """One changing command on opslib's locked session ``conn``: what it read before it began, what it
    hands Alembic, and what it tells when it ends (see :func:`_run_change`)."""

    def __init__(self, on: Target, action: str, target: str, url: URL, conn: Connection):
        self.on = on
        self.settings = on.settings
        self.project = on.project
        self.script = self.project.script
        self.action = action
        self.target = target
        self.url = url
        self.conn = conn
        self.database = db.redact_url(url)

    def read_and_plan(
        self,
        x_args: Sequence[str],
        plan: Callable[[ScriptDirectory, tuple[str, ...]], list[Script]],
        destination: Callable[[ScriptDirectory, tuple[str, ...], list[Script]], object],
        on_step: StepCallback | None,
        on_locks: LocksCallback | None,
    ) -> None:
        """Read where the database stands and plan the change, raising before any change when it cannot be made."""
        script, conn = self.script, self.conn
        self.where = self.on.version_table(conn)
        self.ours = db.identity(conn)
        self.before = current_revisions(conn, self.where)
        _pending(script, self.before, self.database)  # refuses a database at a revision the code lacks
        self.steps = plan(script, self.before)
        self.cfg = alembic_config(self.settings, url=self.url, connection=conn, x_args=x_args, driver=self.on.driver)
        self.guard = _IndexGuard(script, conn, self.action, self.steps) if self.action != "stamp" else None
        self.progress = _Progress(script, self.action, on_step, self.guard, on_locks)
        self.canceller = _Canceller(self.url)
        self.dest = destination(script, self.before, self.steps)
        self.captured = io.StringIO()

    def work(self, rev, context):
        """The work handed to env.py: Alembic's walk for this action to the destination."""
        if self.action == "stamp":
            return self.script._stamp_revs(self.dest, rev)
        if self.action == "upgrade":
            return self.script._upgrade_revs(self.dest, rev)
        return self.script._downgrade_revs(self.dest, rev)

    def same_target(self, connection: Connection) -> None:
        """Refuse the connection env.py configured unless it reaches opslib's target and its version table."""
        # Before any work: env.py's connection must reach opslib's target, whose lock, backup and
        # history this change is under. And its online version table must be the one read above.
        if connection is not self.conn:
            check_same_database(self.ours, self.url, connection)
        configured = self.project.version_tables.get(self.project.env_key())
        if configured is not None and configured != self.where:
            self.project.remember_version_table(self.settings, self.project.env_key(), configured)
            raise ConfigError(
                f"the project's env.py now keeps its revision in {table_name(configured)}, not "
                f"{table_name(self.where)} as opslib read it; nothing was changed: run the command again"
            )
        # Only now, with the target confirmed, may the change give the database opslib's history
        # tables (a refused change leaves it as it was); main waits on the worker meanwhile.
        db_history.ensure_schema(self.conn)

    def attempt(self) -> None:
        """One run of the Alembic command (retried by ``_retrying`` after a lock timeout)."""
        _run_env(
            self.cfg,
            self.project,
            self.work,
            destination_rev=self.dest,
            on_version_apply=self.progress,
            lock_timeout_ms=max(int(self.settings.ddl_lock_timeout_s * 1000), 1),
            canceller=self.canceller,
            on_connection=self.same_target,
        )

    def after_timeout(self) -> str:
        """After an attempt that timed out: report what committed, and say which revision is retried."""
        # Revisions before the one that timed out have committed; say which one is retried.
        now = _applied_set(self.script, current_revisions(self.conn, self.where))
        self.progress.settle(now)
        waiting = next(
            (s.revision for s in self.steps if (s.revision in now) != (self.action == "upgrade")), self.target
        )
        return f"{self.action} {waiting}"

    def run(self, on_attempt: AttemptCallback | None, finished: list) -> tuple[str, ...]:
        """Run the change, retried after lock timeouts; the database's revisions after it (also put in
        ``finished`` with the database, before a late signal is raised)."""
        # From here to the end, a signal is noted: the work under way stops at its next safe point (the
        # worker cancels its statement, a retry's wait ends), and one that comes once the work is done
        # waits for the revision to be read, so that the command still says where the database stands.
        with signals_noted() as late:
            try:
                with _capture_alembic_output(self.captured), _ddl_lock_timeout(
                    self.conn, self.settings.ddl_lock_timeout_s
                ):
                    _retrying(self.settings, self.attempt, self.after_timeout, on_attempt, self.guard, late)
            except BaseException as err:  # noqa: BLE001 - any failure, Ctrl-C included, says where the database stands
                after = _revisions_after_failure(self.conn, self.url, self.database, self.where)
                if isinstance(err, InvalidInput) and set(self.before) == set(after):
                    raise  # refused before any work (env.py reaches another database, say): nothing changed
                raise self.failure(err, after) from err
            after = current_revisions(self.conn, self.where)
            self.progress.settle(_applied_set(self.script, after))
            finished[:] = [self.database, after]
        if late:
            raise _finished_before(late[0], self.action, self.target, self.database, after)
        return after

    def failure(self, err: BaseException, after: tuple[str, ...]) -> OpsError:
        """The error a failed change raises, once what committed is reported, what a signal left invalid
        dropped, and what the migrations printed kept on it."""
        self.progress.settle(_applied_set(self.script, after))
        guard = self.guard
        # A signal cancels a concurrent build under way, which leaves its index invalid: not this run's.
        dropped = guard.drop_after_interrupt(self.settings) if guard and isinstance(err, KeyboardInterrupt) else ""
        failure = _failure(
            self.action, self.target, self.database, self.script, self.before, after, self.steps, err, self.url,
            self.progress.last_called, dropped, partly=guard is not None and guard.ran_autocommit(),
        )
        failure.output = self.captured.getvalue()
        return failure

    def result(self, after: tuple[str, ...]) -> MigrationResult:
        """What the change did, once it has ended with the database at ``after``."""
        head_ids = set(self.script.get_heads())
        return MigrationResult(
            action=self.action,
            target=self.target,
            database=self.database,
            before=self.before,
            after=after,
            steps=tuple(_info(s, head_ids) for s in self.steps),
            output=self.captured.getvalue(),
        )


RECONNECT_S = 20.0  # how long a failed change keeps asking a server that went away where the database stands


def _revisions_after_failure(conn: Connection, url: URL, database: str, where) -> tuple[str, ...]:
    """Where the database stands after a failure, read on the same connection or, if that died, a new one."""
    try:
        if conn.in_transaction():
            conn.rollback()
        return current_revisions(conn, where)
    except DBAPIError:
        pass
    # The server may be restarting (the failure may be that restart): ask again for a while.
    deadline = time.monotonic() + RECONNECT_S
    while True:
        try:
            with db.connect(url) as fresh:
                return current_revisions(fresh, where)
        except (DBAPIError, OpsError):
            if time.monotonic() < deadline:
                time.sleep(0.5)
                continue
        raise MigrationFailed(
            f"the migration failed and {database} cannot be reached to read its revision: "
            "run `opslib status` once it is back",
            changed=True,
        ) from None


def _rolled_back(revision: Script) -> str:
    """What became of a revision stopped part-way: its transaction rolled back, except what it ran in an
    ``autocommit_block`` (committed statement by statement, as CONCURRENTLY needs)."""
    try:
        source = Path(revision.path).read_text(encoding="utf-8")
    except OSError:
        source = ""
    if "autocommit_block" in source:
        return "whose transaction was rolled back (what it ran in its autocommit_block stays committed)"
    return "which was rolled back"


def _finished_before(signum: int, action: str, target: str, database: str, after: tuple[str, ...]) -> Interrupted:
    """A signal that came once the change was done (its revisions committed): the command ends as
    interrupted, as the contract says for any signal, and says the change is whole and where it stands."""
    return Interrupted(
        signum,
        f"{action} to {target} had finished when it was interrupted ({signal.Signals(signum).name}): "
        f"{database} is now at {_describe(after)}",
        revisions=after,
    )


def _failure(
    action, target, database, script, before, after, steps, err, url, last_called=None, dropped="", partly=False
) -> OpsError:
    """The error for a failed change: which revision failed, why, and where the database stands.

    The database says which revisions committed; when none did although some ran to their end
    (``last_called``: an env.py running everything inside a transaction of its own, rolled back
    whole), the revision after the last one that ran to its end is the one that failed.
    """
    if isinstance(err, (CommandError, RevisionError)) and set(before) == set(after):
        return InvalidInput(
            f"{action} {target}: {db.scrub(str(err), url)}; the database is unchanged at {_describe(after)}"
        )
    applied_now = {s.revision for s in _between(script, after, ())} if after else set()
    if action == "downgrade":  # steps newest first: the failing one is the first still applied
        failed = next((s for s in steps if s.revision in applied_now), None)
    else:  # steps oldest first: the failing one is the first not yet applied
        failed = next((s for s in steps if s.revision not in applied_now), None)
    ids = [s.revision for s in steps]
    if set(before) == set(after) and last_called in ids and ids.index(last_called) + 1 < len(ids):
        failed = steps[ids.index(last_called) + 1]
    where = f" at revision {failed.revision} ({failed.doc})" if failed else ""
    if isinstance(err, KeyboardInterrupt):
        signum = getattr(err, "signum", signal.SIGINT)
        if failed is None and steps and not dropped:  # every planned revision had committed
            return _finished_before(signum, action, target, database, after)
        return Interrupted(
            signum,
            f"{action} to {target} was interrupted ({signal.Signals(signum).name})"
            + (f"{where}, {_rolled_back(failed)}" if failed else "")
            + dropped
            + f": {database} is now at {_describe(after)}; run `opslib {action}` again to continue",
            revisions=after,
        )
    known = db.config_error_of(err)
    if known is not None and set(before) == set(after) and not partly:  # a privilege the role lacks: exit 2
        return ConfigError(f"{action} to {target}{where}: {known.message}; {database} is unchanged at {_describe(after)}")
    if known is not None:
        cause = known.message
    elif isinstance(err, OpsError):
        cause = err.message
    elif isinstance(err, SQLAlchemyError):
        # The driver's exception class says what kind of failure (DivisionByZero, UndefinedColumn, ...).
        cause = f"{type(getattr(err, 'orig', None) or err).__name__}: {db.driver_message(err, url)}"
    else:
        lines = str(err).strip().splitlines()
        cause = db.scrub(f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__, url)
    return MigrationFailed(
        f"{action} to {target} failed{where}: {cause}. {database} is now at {_describe(after)}; "
        f"fix the cause and run `opslib {action}` again, or `opslib status` to see what is pending",
        changed=set(before) != set(after),
        revisions=after,
    )
