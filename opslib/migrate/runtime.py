"""Running the project's env.py: the worker thread, cancellation, the session's terms, and progress.

Modelled on ``alembic/runtime``: opslib runs env.py itself (as ``alembic.command`` does) on the
ScriptDirectory it has loaded, with its own terms added to what env.py configures: each revision
commits on its own, a signal stops the work at a safe point, and every revision that commits is
reported (and recorded in opslib's history) exactly when it does.
"""

from __future__ import annotations

import contextvars
import io
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from typing import Callable, Iterator

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError

from opslib import batch, db
from opslib import history as db_history
from opslib.errors import Interrupted, OpsError, TargetMismatch
from opslib.migrate.guards import _IndexGuard
from opslib.migrate.project import Project
from opslib.migrate.results import LocksCallback, StepCallback
from opslib.migrate.revisions import _info
from opslib.signals import signals_noted


class _Worker:
    """Alembic's work in a thread of its own, watched without locks.

    The waiting thread only sleeps and reads ``done``, a plain attribute: a signal's exception (raised
    wherever the waiting thread happens to be) can then never land inside a lock's acquire/release
    pair, which would leave that lock broken ("release unlocked lock") and the migration unstopped.
    """

    def __init__(self, fn: Callable[[], object]):
        self.done = False
        self.result: object = None
        self.error: BaseException | None = None
        context = contextvars.copy_context()  # the run id the history rows carry, and the like

        def work() -> None:
            try:
                self.result = context.run(fn)
            except BaseException as err:  # noqa: BLE001 - handed to the waiting thread as it is
                self.error = err
            finally:
                self.done = True

        self.thread = threading.Thread(target=work, name="opslib-alembic", daemon=True)
        self.thread.start()

    def sleep_until_done(self, seconds: float | None = None) -> None:
        """Sleep in tenths of a second until the work is done (or ``seconds`` have passed)."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while not self.done and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.1)

    def outcome(self) -> object:
        """The work's return value, or its exception raised."""
        if self.error is not None:
            raise self.error
        return self.result


def _outside_event_loop(fn: Callable[[], object], canceller: "_Canceller | None" = None) -> object:
    """Call ``fn`` in a worker thread, where no asyncio event loop runs, and wait for it interruptibly.

    A Jupyter kernel runs its cells inside a running loop, and an env.py made from Alembic's async
    template calls ``asyncio.run()``, which refuses to run there; the worker carries this context's
    variables (such as the run id the history rows carry).

    While the worker runs, SIGINT and SIGTERM only note themselves (in the main thread, where Python
    runs signal handlers): no exception can land mid-way through starting the thread or waiting for
    it. A signal noted has the work stopped through ``canceller``: its sessions' statements cancelled
    on the server, and no further revision begun (offline rendering, which has no session, stops at
    its next revision). Only once the worker has ended, with the database at a revision that
    committed, is :class:`Interrupted` raised: the call never returns while its worker runs.
    """
    with signals_noted() as caught:
        worker = _Worker(fn)
        while not worker.done:
            if caught and canceller is not None and canceller.stopping is None:
                canceller.stop_until_done(worker, caught[0])
            # Woken at least every tenth of a second: a signal the OS delivered to another thread (a kernel
            # has several) only runs its Python handler when this thread runs Python code. Joining rather
            # than sleeping returns the moment the work ends (sleeping cost 0.05 s a call on average).
            worker.thread.join(0.1)
        worker.thread.join()
    if caught:
        raise Interrupted(caught[0])
    return worker.outcome()


class _Canceller:
    """Stops a migration under way: cancels what its sessions run on the server, and has the next
    revision boundary raise instead of beginning another revision."""

    def __init__(self, url: URL | None):
        # None: offline work, with no session to cancel (only the boundary check), unless env.py connects
        # anyway: its server is then the one asked (see ``watch``).
        self.url = url
        self.pids: set[int] = set()
        self.stopping: Interrupted | None = None

    def watch(self, connection) -> None:
        """Note the server session behind a connection env.py configured."""
        pid = _backend_pid(connection)
        if pid:
            self.pids.add(pid)
            if self.url is None:
                self.url = _cancel_url(connection)

    def check(self, **_kw) -> None:
        """An ``on_version_apply`` callback: once stopping, the revision in progress is rolled back."""
        if self.stopping is not None:
            raise self.stopping

    def stop_until_done(self, worker: _Worker, signum: int = signal.SIGINT) -> None:
        """Cancel the sessions' statements until the worker has ended (a statement that begins after a
        cancel is cancelled in turn); a server out of reach leaves only the wait."""
        self.stopping = self.stopping or Interrupted(signum)
        # Python work between statements stops at the next revision boundary (``check``): an exception
        # injected into the worker could land inside the thread pool's own locking.
        if self.url is None:
            worker.sleep_until_done()
            return
        try:
            with db.connect(self.url) as conn:
                while not worker.done:
                    for pid in sorted(self.pids):
                        conn.execute(sa.text("SELECT pg_cancel_backend(:pid)"), {"pid": pid})
                    conn.commit()
                    worker.sleep_until_done(0.2)
        except (OpsError, DBAPIError):
            pass


def _watching(url: URL, conn: Connection) -> _Canceller:
    """A canceller of reads Alembic makes on opslib's own session (``check``, autogenerate): a Ctrl-C
    cancels the statement under way, so the command ends before opslib closes the session under it."""
    canceller = _Canceller(url)
    canceller.watch(conn)
    return canceller


def _cancel_url(connection) -> URL | None:
    """A URL opslib's own driver can reach the server of ``connection`` with, to cancel its statements."""
    try:
        url = connection.engine.url
        driver = connection.dialect.driver
    except Exception:  # noqa: BLE001 - no engine to ask: nothing to cancel with
        return None
    # Another driver's query options (asyncpg's ssl=, prepared_statement_cache_size=) mean nothing to libpq.
    return url.set(drivername="postgresql+psycopg2", query=url.query if driver in _LIBPQ_DRIVERS else {})


def _backend_pid(connection) -> int | None:
    """The server process behind a SQLAlchemy connection, read from the driver without a query."""
    try:
        raw = connection.connection.dbapi_connection
    except Exception:  # noqa: BLE001 - a closed or unusual connection: nothing to cancel then
        return None
    info = getattr(raw, "info", None)  # psycopg2, psycopg 3
    if info is not None and getattr(info, "backend_pid", None):
        return int(info.backend_pid)
    inner = getattr(raw, "_connection", None)  # SQLAlchemy's asyncpg adapter
    if inner is not None and hasattr(inner, "get_server_pid"):
        return int(inner.get_server_pid())
    return None



@contextmanager
def _capture_alembic_output(buf: io.StringIO | None = None) -> Iterator[io.StringIO]:
    """Collect what Alembic, env.py and the revisions print or log while opslib runs them.

    opslib returns data instead: the collected text is the result's ``output``. Kept out of
    stdout, it cannot break ``opslib sql``'s SQL or ``--json``; kept out of stderr, an env.py that
    configures logging at INFO (``fileConfig``) cannot flood a terminal or a notebook, line by line.
    """
    buf = io.StringIO() if buf is None else buf
    # Logging handlers hold the stream they were made with (the command's own basicConfig holds the real
    # stderr): for the run, the root logger writes to the buffer instead, whatever env.py configures.
    root = logging.getLogger()
    saved = root.handlers[:]
    capture = logging.StreamHandler(buf)
    capture.setFormatter(logging.Formatter("%(levelname)-5.5s [%(name)s] %(message)s"))
    root.handlers = [capture]
    # A batched data migration's progress bar still reaches the terminal or the notebook.
    shown = batch.set_progress_stream(batch.progress_stream())
    try:
        with redirect_stdout(buf), redirect_stderr(buf):
            yield buf
    finally:
        root.handlers = saved
        batch.set_progress_stream(shown)


def _run_env(
    cfg: Config,
    project: Project,
    fn: Callable,
    *,
    as_sql: bool = False,
    starting_rev: str | None = None,
    destination_rev=None,
    on_version_apply: Callable | None = None,
    lock_timeout_ms: int | None = None,
    canceller: _Canceller | None = None,
    on_connection: Callable[[Connection], None] | None = None,
    **context_opts,
) -> None:
    """Run the project's env.py once with ``fn`` as the work, as ``alembic.command`` does, on our loaded script.

    ``on_connection`` is called with the connection env.py configures, before Alembic uses it: it may
    raise to stop the command before any work (the connection reaches another database, say).
    ``context_opts`` go to Alembic's migration context (``dont_mutate=True`` for a run that only reads).

    ``lock_timeout_ms`` is set on the connection env.py configures when its driver does not read
    ``PGOPTIONS`` (asyncpg): libpq's connections get it from there.

    With ``on_version_apply`` (a change to the database), opslib's terms are added to whatever
    env.py passes to ``context.configure``: each revision commits on its own
    (``transaction_per_migration``) and the callback runs inside each revision's transaction, even
    when env.py asks for neither (Alembic's generic template runs a whole upgrade in one
    transaction). A failure at revision N then leaves the database at N-1, and the history row of
    every revision commits exactly when the revision does.
    """
    script = project.script
    env = EnvironmentContext(
        cfg,
        script,
        fn=fn,
        as_sql=as_sql,
        starting_rev=starting_rev,
        destination_rev=destination_rev,
        **context_opts,
    )
    # env.py calls `context.configure`, which Alembic's module proxy sends to this instance.
    env.configure = _with_opslib_terms(
        env.configure, project, on_version_apply, lock_timeout_ms, canceller, on_connection
    )

    def run() -> None:
        with env:
            script.run_env()

    _outside_event_loop(run, canceller)


def _with_opslib_terms(
    configure: Callable,
    project: Project,
    on_version_apply: Callable | None,
    lock_timeout_ms: int | None,
    canceller: _Canceller | None,
    on_connection: Callable[[Connection], None] | None,
) -> Callable:
    """``configure`` (the environment's ``context.configure``) with opslib's terms added to what env.py
    passes it, as :func:`_run_env` describes."""

    def configure_with_opslib_terms(*args, **kwargs):
        connection = kwargs.get("connection")
        if connection is not None:
            # Where the project keeps its revision, as env.py says online (its offline branch often
            # leaves version_table out): opslib's own reads use the same table from now on.
            project.note_version_table(_configured_table(kwargs))
            if on_connection is not None:
                on_connection(connection)
        if canceller is not None and connection is not None:
            canceller.watch(connection)
        if connection is not None and connection.dialect.driver not in _LIBPQ_DRIVERS:
            _set_session_terms(connection, lock_timeout_ms)
        stop = [canceller.check] if canceller is not None else []  # a signal stops at the next revision
        ours = [on_version_apply] if on_version_apply is not None else []
        if stop or ours:
            given = kwargs.get("on_version_apply") or ()
            kwargs["on_version_apply"] = [*stop, *([given] if callable(given) else given), *ours]
        if on_version_apply is not None:
            kwargs["transaction_per_migration"] = True
        return configure(*args, **kwargs)

    return configure_with_opslib_terms


# Drivers built on libpq, which read PGAPPNAME and PGOPTIONS themselves (psycopg 3 included): the
# sessions of every other driver (asyncpg, pg8000) get the run's terms from ``_set_session_terms``.
_LIBPQ_DRIVERS = frozenset({"psycopg2", "psycopg2cffi", "psycopg", "psycopg_async"})


def _set_session_terms(connection, lock_timeout_ms: int | None) -> None:
    """What libpq's connections take from the environment, set on a connection whose driver does not
    read it (asyncpg, pg8000): the lock timeout (PGOPTIONS) and the run's name (PGAPPNAME), by which
    the sessions of a run that died are found and ended. Bound parameters: any name is sent as it is."""
    terms = {"application_name": os.environ.get("PGAPPNAME")}
    if lock_timeout_ms:
        terms["lock_timeout"] = f"{lock_timeout_ms}ms"
    terms = {k: v for k, v in terms.items() if v}
    if not terms or connection.in_transaction():  # never inside a transaction env.py began itself
        return
    for name, value in terms.items():
        connection.execute(sa.text("SELECT set_config(:name, :v, false)"), {"name": name, "v": value})
    connection.commit()


def _configured_table(kwargs: dict) -> tuple[str | None, str]:
    """(schema, table) of the version table in the arguments env.py gave ``context.configure``."""
    return (kwargs.get("version_table_schema") or None, kwargs.get("version_table") or "alembic_version")



def check_same_database(ours: db.DatabaseIdentity, url: URL, connection: Connection, env_url: str | None = None) -> None:
    """Refuse (:class:`TargetMismatch`, exit 2) when the connection the project's env.py configured
    reaches another database than opslib's target ``url`` (whose session is ``ours``)."""
    theirs = db.identity(connection)
    if theirs.pid == ours.pid or db.same_database(ours, theirs, connection):
        return
    shown = env_url or db.redact_url(connection.engine.url)
    raise TargetMismatch(
        f"the project's env.py connects to {shown} ({theirs.describe()}), not to opslib's target "
        f"{db.redact_url(url)} ({ours.describe()}); nothing was changed. Make them one: set DATABASE_URL to "
        "the database env.py uses, or have env.py take the URL opslib hands it "
        "(config.get_main_option('sqlalchemy.url'), or config.attributes['connection'])"
    )



class _Progress:
    """Follows one Alembic command revision by revision, from inside each revision's transaction.

    For every revision it writes the history row (in that transaction), and reports the revision
    to ``on_step`` once it is known to have committed: when the next revision's transaction has
    begun, or, for the last one, when the database says so.
    """

    def __init__(
        self,
        script: ScriptDirectory,
        action: str,
        on_step: StepCallback | None,
        guard: _IndexGuard | None = None,
        on_locks: LocksCallback | None = None,
    ):
        self.script = script
        self.action = action
        self.on_step = on_step
        self.on_locks = on_locks
        self.guard = guard  # checks the revision's indexes before its version row commits
        self.mark = time.perf_counter()
        self.mark_wall = time.time()  # when the revision under way started: reported later, it is kept
        self.unconfirmed: list[tuple[str, float, float]] = []  # (revision, seconds, started), not yet committed
        self.last_called: str | None = None  # the last revision whose transaction reached its end

    def __call__(self, ctx, step, heads, run_args) -> None:
        if self.guard is not None:  # raising here rolls the revision's version row back
            self.guard.check(ctx.connection, step)
        if self.on_locks is not None:
            # Still inside the revision's transaction: it holds every lock it took until it commits.
            schema, table = ctx.version_table_schema, ctx.version_table
            # Alembic's version row and opslib's history row are the bookkeeping, not the revision's work.
            skip = {f"{schema or 'public'}.{table}", "opslib"}
            self.on_locks(step.up_revision_id, db.relation_locks_held(ctx.connection, skip))
        db_history.record_step(ctx.connection, db_history.current_run_id(), step)
        # An env.py that runs everything inside a transaction of its own commits nothing early.
        if not getattr(ctx, "_in_external_transaction", False):
            self._report(self.unconfirmed)  # this transaction began, so the previous one committed
            self.unconfirmed = []
        now = time.perf_counter()
        self.unconfirmed.append((step.up_revision_id, now - self.mark, self.mark_wall))
        self.last_called = step.up_revision_id
        self.mark, self.mark_wall = now, time.time()

    def settle(self, applied: set[str]) -> None:
        """Report the revisions still unconfirmed that the database shows committed (``applied`` now)."""
        done = [item for item in self.unconfirmed if (item[0] in applied) == (self.action == "upgrade")]
        self._report(done)
        self.unconfirmed = []
        self.mark, self.mark_wall = time.perf_counter(), time.time()

    def _report(self, items: list[tuple[str, float, float]]) -> None:
        for revision, seconds, started in items:
            if self.on_step is not None:
                self.on_step(_info(self.script.get_revision(revision), set()), seconds, started)
