"""Alembic verbs that return data instead of printing.

Modelled on ``alembic/command.py``: each verb is a thin function over Config -> ScriptDirectory ->
EnvironmentContext. The Alembic project is whatever ``Settings.alembic_ini`` points at, so any
Alembic project on PostgreSQL works. Verbs that change the database run on one connection that
holds the opslib advisory lock; that connection is handed to the project's ``env.py`` through
``config.attributes["connection"]`` (an env.py that opens its own connection from
``sqlalchemy.url`` gets the same URL, in memory only).

Errors from Alembic and the driver are turned into :mod:`opslib.errors` here, each saying where
the database now stands.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import contextvars
import hashlib
import io
import json
import logging
import os
import re
import signal
import threading
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import RevisionContext
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import Script, ScriptDirectory
from alembic.script.revision import MultipleHeads, RevisionError
from alembic.util.exc import CommandError
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from opslib import batch, db
from opslib import history as db_history
from opslib.config import Settings
from opslib.errors import (
    ConfigError,
    Interrupted,
    InvalidInput,
    MigrationFailed,
    OpsError,
    PreconditionFailed,
    TargetMismatch,
    UnknownRevision,
)
from opslib.naming import vague_message
from opslib.signals import signals_noted

# (revision, seconds it took, when it started as a Unix time): called once it is known to have committed.
StepCallback = Callable[["RevisionInfo", float, float], None]
LocksCallback = Callable[[str, "list[db.RelationLock]"], None]
# (what was being done, attempt number, why it gave up): one call per attempt that hit the lock timeout.
AttemptCallback = Callable[[str, int, str], None]

# A dialect-only URL for offline SQL: no server is needed, and no password can leak into it.
OFFLINE_URL = "postgresql+psycopg2://"


@dataclass(frozen=True)
class RevisionInfo:
    """One revision of the chain, as the operator needs to see it."""

    revision: str
    down_revisions: tuple[str, ...]
    message: str
    is_head: bool
    is_merge: bool
    branch_labels: tuple[str, ...]
    path: str
    doc: str

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class Status:
    """Where the database stands against the chain."""

    database: str
    current: tuple[str, ...]
    heads: tuple[str, ...]
    pending: tuple[RevisionInfo, ...]

    @property
    def at_head(self) -> bool:
        """True when the database is at every head of the chain (nothing pending)."""
        return set(self.current) == set(self.heads)

    def to_dict(self) -> dict:
        """A JSON-ready dict with ``current``, ``heads``, ``pending`` and ``at_head``."""
        return {
            "database": self.database,
            "current": list(self.current),
            "heads": list(self.heads),
            "pending": [{"revision": r.revision, "message": r.message} for r in self.pending],
            "at_head": self.at_head,
        }


@dataclass(frozen=True)
class MigrationResult:
    """What a verb that changes the database did."""

    action: str
    target: str
    database: str
    before: tuple[str, ...]
    after: tuple[str, ...]
    steps: tuple[RevisionInfo, ...] = field(default=())
    output: str = ""  # what the project's env.py and revisions printed or logged

    @property
    def changed(self) -> bool:
        """True when the database's revision moved."""
        return set(self.before) != set(self.after)

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {
            "action": self.action,
            "target": self.target,
            "database": self.database,
            "before": list(self.before),
            "after": list(self.after),
            "steps": [{"revision": r.revision, "message": r.message} for r in self.steps],
            "changed": self.changed,
        }


# --- the Alembic project ---------------------------------------------------------------------


def alembic_config(
    settings: Settings,
    *,
    url: URL | str | None = None,
    connection: Connection | None = None,
    x_args: Sequence[str] = (),
    output: io.StringIO | None = None,
) -> Config:
    """An Alembic Config for the project at ``settings.alembic_ini``, wired to opslib's target.

    The URL is set in memory only (never written to the ini file); ``%`` is doubled because the
    ini parser interpolates it.
    """
    ini = Path(settings.alembic_ini)
    if not ini.is_file():
        raise ConfigError(
            f"Alembic config not found at {ini}: set OPSLIB_ALEMBIC_INI to your project's alembic.ini"
        )
    for value in x_args:
        key, sep, _ = value.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"-x takes KEY=VALUE, not {value!r}")
    cfg = Config(str(ini), output_buffer=output, stdout=io.StringIO())
    try:
        cfg.get_main_option("script_location")  # read now: a file that is not an ini file is named
    except CommandError as err:  # no [alembic] section
        raise ConfigError(f"{err}: set OPSLIB_ALEMBIC_INI to your project's alembic.ini") from None
    except (UnicodeDecodeError, configparser.Error) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{ini} is not an ini file Alembic can read ({type(err).__name__}: {first}): set OPSLIB_ALEMBIC_INI "
            "to your project's alembic.ini"
        ) from None
    cfg.cmd_opts = argparse.Namespace(x=list(x_args))
    cfg.attributes["configure_logger"] = False
    if connection is not None:
        cfg.attributes["connection"] = connection
    if url is not None:
        if not isinstance(url, str):
            url = url.set(drivername=db.env_driver(settings.database_url) or _project_driver(cfg, url.drivername))
        rendered = url if isinstance(url, str) else url.render_as_string(hide_password=False)
        cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return cfg


def _project_driver(cfg: Config, ours: str) -> str:
    """The driver the project's own ``sqlalchemy.url`` names (``postgresql+asyncpg`` for an async env.py),
    so the URL opslib hands to env.py is one its engine can use; opslib's own connections stay on psycopg2.
    A driver the target URL itself names (``DATABASE_URL=postgresql+asyncpg://…``) comes first."""
    try:
        raw = cfg.get_main_option("sqlalchemy.url") or ""
    except Exception:  # noqa: BLE001 - an option that does not interpolate: opslib's driver then
        return ours
    scheme = raw.split("://", 1)[0] if "://" in raw else ""
    return scheme if scheme.startswith("postgresql+") else ours


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


# Loaded projects by alembic.ini, with the state of their revision files when loaded. Building
# Alembic's revision map imports every revision file (most of a long chain's start-up), so a run
# builds it once and every later step reuses it until a revision file is added, removed or edited.
_LOADED: dict[str, tuple[tuple, ScriptDirectory]] = {}


def script_directory(settings: Settings) -> ScriptDirectory:
    """The project's revision scripts, loaded once per process while its files are unchanged.

    A broken project is a :class:`ConfigError`.
    """
    cfg = alembic_config(settings)
    try:
        fresh = ScriptDirectory.from_config(cfg)
    except (CommandError, RevisionError) as err:
        raise ConfigError(f"cannot load the Alembic project of {settings.alembic_ini}: {err}") from err
    key = str(Path(settings.alembic_ini).resolve())
    state = _files_state(fresh, Path(settings.alembic_ini))
    loaded = _LOADED.get(key)
    if loaded is not None and loaded[0] == state:
        return loaded[1]
    _load_revisions(fresh, settings)
    _LOADED[key] = (state, fresh)
    return fresh


def _load_revisions(script: ScriptDirectory, settings: Settings) -> None:
    """Import every revision file and build the graph now, so that a broken file or graph is a
    :class:`ConfigError` (exit 2) naming what to fix, before any command reads or changes anything."""
    try:
        script.revision_map._revision_map  # noqa: B018 - Alembic's memoized map: reading it loads everything
    except SyntaxError as err:
        raise ConfigError(
            f"revision file {err.filename}, line {err.lineno}, is not valid Python: {err.msg}; fix it first"
        ) from None
    except ImportError as err:
        missing = err.name or str(err)
        raise ConfigError(
            f"revision file {_failing_file(err, script) or '(unknown)'}, imports {missing!r}, which cannot be "
            f"imported here: install it, or fix the import"
        ) from None
    except RevisionError as err:
        cycle = re.search(r"\(([^)]*)\)", str(err))
        if type(err).__name__.endswith("CycleDetected") and cycle:
            raise ConfigError(
                f"the revisions' down_revision form a cycle through {cycle.group(1)}: each must point to an "
                "older revision; fix down_revision in one of them"
            ) from None
        raise ConfigError(f"the revisions of {settings.alembic_ini} do not form a history: {err}") from None
    except CommandError as err:
        raise ConfigError(f"cannot load the revisions of {settings.alembic_ini}: {err}") from None
    except Exception as err:  # noqa: BLE001 - a revision's module-level code failed on import
        lines = str(err).strip().splitlines()
        raise ConfigError(
            f"revision file {_failing_file(err, script) or '(unknown)'} fails on import: "
            f"{type(err).__name__}: {lines[0] if lines else ''}"
        ) from None


def _failing_file(err: BaseException, script: ScriptDirectory) -> str | None:
    """The revision file in whose import ``err`` was raised (the innermost frame in a version folder)."""
    import traceback

    folders = [str(Path(location).resolve()) for location in script._version_locations]
    found = None
    for frame in traceback.extract_tb(err.__traceback__):
        if any(str(Path(frame.filename).resolve()).startswith(folder) for folder in folders):
            found = f"{frame.filename}, line {frame.lineno}"
    return found


def _files_state(script: ScriptDirectory, ini: Path) -> tuple:
    """What identifies the revision files as they are now: every file's name, size and mtime."""
    entries = [(str(ini), ini.stat().st_mtime_ns)]
    for location in script._version_locations:
        folder = Path(location)
        if not folder.is_dir():
            continue
        files = folder.rglob("*.py") if script.recursive_version_locations else folder.glob("*.py")
        for path in files:
            try:
                st = path.stat()
            except OSError:
                continue
            entries.append((str(path), st.st_size, st.st_mtime_ns))
    return tuple(sorted(entries))


def _info(script: Script, heads: set[str]) -> RevisionInfo:
    down = script.down_revision
    downs = () if down is None else ((down,) if isinstance(down, str) else tuple(down))
    return RevisionInfo(
        revision=script.revision,
        down_revisions=downs,
        message=(script.doc or "").strip(),
        is_head=script.revision in heads,
        is_merge=script.is_merge_point,
        branch_labels=tuple(sorted(script.branch_labels)),
        path=script.path,
        doc=_details(script),
    )


def _details(script: Script) -> str:
    """The revision's docstring without its first line, which is already the message."""
    lines = (script.longdoc or "").strip().splitlines()
    return "\n".join(lines[1:]).strip()


def _check_revision_text(rev: object, what: str = "revision") -> str:
    if not isinstance(rev, str):
        raise InvalidInput(f"{what} must be a string, not {type(rev).__name__} {rev!r}")
    rev = rev.strip()
    if not rev:
        raise InvalidInput(f"{what} is empty: give a revision id, 'head' or 'base'")
    return rev


def resolve(script: ScriptDirectory, rev: str) -> tuple[Script, ...]:
    """The revisions ``rev`` names (an id, a unique prefix, head, heads, base, label@rev)."""
    rev = _check_revision_text(rev)
    if rev == "base":
        return ()
    try:
        # The revision map, not ScriptDirectory.get_revisions: the latter folds every error into
        # one CommandError, and the type tells an ambiguous prefix from several heads.
        found = script.revision_map.get_revisions(rev)
    except MultipleHeads:
        raise PreconditionFailed(
            f"{rev!r} is ambiguous: the chain has several heads; run `opslib merge -m MSG` or name a revision"
        ) from None
    except (RevisionError, CommandError) as err:
        text = str(err)
        if "Multiple revisions start with" in text:
            raise UnknownRevision(f"revision {rev!r} is ambiguous: {text}; give more characters") from None
        raise UnknownRevision(
            f"unknown revision {rev!r}: run `opslib history` to list the revisions"
        ) from None
    if not found or any(s is None for s in found):
        raise UnknownRevision(f"unknown revision {rev!r}: run `opslib history` to list the revisions")
    return tuple(found)


def history(settings: Settings) -> list[RevisionInfo]:
    """Every revision of the chain, newest first."""
    script = script_directory(settings)
    heads = set(script.get_heads())
    return [_info(s, heads) for s in script.walk_revisions()]


def heads(settings: Settings) -> list[RevisionInfo]:
    """The head revision(s) of the chain; more than one means a merge is needed."""
    script = script_directory(settings)
    head_ids = set(script.get_heads())
    return [_info(script.get_revision(h), head_ids) for h in script.get_heads()]


def show(settings: Settings, rev: str) -> RevisionInfo:
    """Details of one revision."""
    script = script_directory(settings)
    found = resolve(script, rev)
    if len(found) != 1:
        raise UnknownRevision(f"{rev!r} names {len(found) or 'no'} revisions; give one revision id")
    return _info(found[0], set(script.get_heads()))


def _between(script: ScriptDirectory, upper: Sequence[str] | str, lower: Sequence[str]) -> list[Script]:
    """Revisions above ``lower`` up to and including ``upper``, oldest first."""
    lower_arg = tuple(lower) if lower else "base"
    upper_arg = tuple(upper) if not isinstance(upper, str) else upper
    scripts = list(script.iterate_revisions(upper_arg, lower_arg))
    scripts.reverse()
    return [s for s in scripts if s.revision not in set(lower)]


def _upgrade_path(script: ScriptDirectory, destination: str | Sequence[str], current: Sequence[str]) -> list[Script]:
    """The revisions Alembic's upgrade from ``current`` to ``destination`` runs, in its order (oldest
    first): the same walk as ``alembic upgrade`` (``ScriptDirectory._upgrade_revs``), so that what opslib
    calls pending is what Alembic will run, whatever the database's revisions (several included)."""
    dest = destination if isinstance(destination, str) else tuple(destination)
    return [step.revision for step in script._upgrade_revs(dest, tuple(current))]


def _downgrade_path(script: ScriptDirectory, destination: str, current: Sequence[str]) -> list[Script]:
    """The revisions Alembic's downgrade from ``current`` to ``destination`` (as the user wrote it)
    reverses, newest first (``ScriptDirectory._downgrade_revs``, the walk ``alembic downgrade`` takes)."""
    return [step.revision for step in script._downgrade_revs(destination, tuple(current))]


# --- the database ----------------------------------------------------------------------------


def revisions_now(settings: Settings, where: Sequence[str | None] | None = None) -> list[str] | None:
    """The target's revisions read now from the version table ``where`` (else the project's), on a
    connection of its own; None, "not read", when they cannot be read: out of reach, lost mid-query (a
    restart), or not an Alembic database yet. What a run records as where it ended."""
    try:
        with db.connect(db.target_url(settings)) as conn:
            table = tuple(where) if where else version_table(settings, conn)
            return list(current_revisions(conn, table))
    except Exception:  # noqa: BLE001 - unreachable, lost, or an env.py that fails when asked its table: not read
        return None


def current_revisions(
    conn: Connection, where: tuple[str | None, str] = db.DEFAULT_VERSION_TABLE
) -> tuple[str, ...]:
    """The revision(s) recorded in the project's version table (see :func:`version_table`); () when at base.

    The read's implicit transaction is committed: the connection may be handed to Alembic next,
    which must find it outside a transaction to run one transaction per revision.
    """
    revs = db.version_revisions(conn, where)
    if conn.in_transaction():
        conn.commit()
    return revs


def _pending(script: ScriptDirectory, current: tuple[str, ...], database: str) -> list[Script]:
    """Revisions not yet applied, oldest first; refuses a database at a revision the code lacks."""
    unknown = [r for r in current if _safe_get_revision(script, r) is None]
    if unknown:
        raise PreconditionFailed(
            f"{database} is at revision {', '.join(unknown)}, which the Alembic project does not "
            "contain: the code is older than the database, or the revision file was removed"
        )
    return _upgrade_path(script, tuple(script.get_heads()), current)


def _safe_get_revision(script: ScriptDirectory, rev: str) -> Script | None:
    try:
        return script.get_revision(rev)
    except (RevisionError, CommandError):
        return None


def status(settings: Settings) -> Status:
    """Current revision(s), heads, and what is pending, read without changing anything."""
    script = script_directory(settings)
    url = db.target_url(settings)
    with db.connect(url) as conn:
        current = current_revisions(conn, version_table(settings, conn))
    head_ids = tuple(sorted(script.get_heads()))
    pending = _pending(script, current, db.redact_url(url))
    return Status(
        database=db.redact_url(url),
        current=current,
        heads=head_ids,
        pending=tuple(_info(s, set(head_ids)) for s in pending),
    )


@contextmanager
def _locked_connection(settings: Settings) -> Iterator[tuple[URL, Connection]]:
    url = db.target_url(settings)
    with db.connect(url) as conn:
        with db.advisory_lock(conn, settings.lock_timeout_s):
            yield url, conn


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
    script: ScriptDirectory,
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
    env = EnvironmentContext(
        cfg,
        script,
        fn=fn,
        as_sql=as_sql,
        starting_rev=starting_rev,
        destination_rev=destination_rev,
        **context_opts,
    )
    configure = env.configure

    def configure_with_opslib_terms(*args, **kwargs):
        connection = kwargs.get("connection")
        if connection is not None:
            # Where the project keeps its revision, as env.py says online (its offline branch often
            # leaves version_table out): opslib's own reads use the same table from now on.
            _VERSION_TABLES[_env_key(script)] = _configured_table(kwargs)
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

    # env.py calls `context.configure`, which Alembic's module proxy sends to this instance.
    env.configure = configure_with_opslib_terms

    def run() -> None:
        with env:
            script.run_env()

    _outside_event_loop(run, canceller)


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


# Where each project keeps its revision, as its env.py configures it online, by _env_key: learned from
# every online run of env.py, and kept on disk (see _remembered) so that the next command knows it too.
_VERSION_TABLES: dict[str, tuple[str | None, str]] = {}
_PROBES_FILE = "version-tables.json"


def _env_key(script: ScriptDirectory) -> str:
    """The project's scripts folder and its env.py's content: what the version table's answer depends on."""
    try:
        digest = hashlib.sha256(Path(script.env_py_location).read_bytes()).hexdigest()[:16]
    except OSError:
        digest = "no-env.py"
    return f"{Path(script.dir).resolve()}#{digest}"


def _remembered(settings: Settings, key: str, found: tuple[str | None, str] | None = None):
    """The version table kept on disk for ``key`` (in the state folder), or, with ``found``, keep it."""
    path = Path(settings.state_dir) / _PROBES_FILE
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        known = {}
    if found is None:
        value = known.get(key)
        return (value[0], value[1]) if isinstance(value, list) and len(value) == 2 else None
    if known.get(key) != list(found):
        known[key] = list(found)
        try:  # a cache: a folder that cannot be written only costs the next command a probe
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
            tmp.replace(path)
        except OSError:
            pass
    return found


@dataclass(frozen=True)
class EnvProbe:
    """What the project's env.py does online, learned from a run of it that does no work."""

    version_table: tuple[str | None, str]
    url: str | None  # the URL of the connection env.py configured, redacted; None when it gave none
    reached: db.DatabaseIdentity | None  # the database that connection reaches


def probe_env(settings: Settings, url: URL, conn: Connection, *, refuse_other: bool = False) -> EnvProbe:
    """Run the project's env.py online with no work (as ``alembic current`` does, changing nothing:
    no version table is created), and learn what it configures: its version table and the database
    its connection reaches. ``conn`` is opslib's own connection to ``url``, offered to env.py. With
    ``refuse_other``, a connection to another database is :class:`TargetMismatch` (exit 2)."""
    script = script_directory(settings)
    cfg = alembic_config(settings, url=url, connection=conn, output=io.StringIO())
    seen: dict = {}
    key = _env_key(script)
    _VERSION_TABLES.pop(key, None)  # learned again, from this run

    def note(connection: Connection) -> None:
        seen["url"] = db.redact_url(connection.engine.url)
        seen["reached"] = db.identity(connection)
        if refuse_other and connection is not conn:
            check_same_database(db.identity(conn), url, connection)

    try:
        with _capture_alembic_output():
            _run_env(cfg, script, lambda rev, context: [], canceller=_watching(url, conn), on_connection=note, dont_mutate=True)
    except (ImportError, SyntaxError, NameError) as err:
        raise _unimportable(script, err) from err
    if conn.in_transaction():
        conn.commit()
    found = _VERSION_TABLES.setdefault(key, db.DEFAULT_VERSION_TABLE)
    _remembered(settings, key, found)
    return EnvProbe(found, seen.get("url"), seen.get("reached"))


def _unimportable(script: ScriptDirectory, err: BaseException) -> ConfigError:
    lines = str(err).strip().splitlines()
    return ConfigError(
        f"the project's env.py ({script.env_py_location}) cannot be imported: {type(err).__name__}: "
        f"{lines[0] if lines else ''}; fix it (or OPSLIB_ALEMBIC_INI) first"
    )


def version_table(settings: Settings, conn: Connection | None = None) -> tuple[str | None, str]:
    """(schema, table) of the project's version table: what its env.py passes to ``context.configure``
    online (``version_table_schema``, ``version_table``), else Alembic's ``alembic_version`` on the search_path.

    Known from any online run of env.py in this process, else from the state folder (kept there per
    project and env.py content), else learned now: env.py is run online with no work on ``conn`` (or a
    connection to the target). Only when env.py cannot run online is its offline branch asked.
    """
    script = script_directory(settings)
    key = _env_key(script)
    known = _VERSION_TABLES.get(key) or _remembered(settings, key)
    if known is not None:
        _VERSION_TABLES[key] = known
        return known
    try:
        if conn is not None:
            return probe_env(settings, db.target_url(settings), conn).version_table
        url = db.target_url(settings)
        with db.connect(url) as own:
            return probe_env(settings, url, own).version_table
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - env.py cannot run online here (the server is out of reach, say)
        pass
    cfg = alembic_config(settings, url=OFFLINE_URL, output=io.StringIO())
    try:
        with _capture_alembic_output():
            # No session to cancel offline; an env.py that connects anyway is cancelled as an upgrade is.
            _run_env(cfg, script, lambda rev, context: [], as_sql=True, canceller=_Canceller(None))
    except (ImportError, SyntaxError, NameError) as err:
        # env.py cannot even be imported: nothing will run, so say so now, before any backup or change.
        raise _unimportable(script, err) from err
    except Exception:  # noqa: BLE001 - an env.py that cannot run offline: Alembic's default is the answer
        pass
    # Not kept: the offline branch may leave out what the online one configures.
    return db.DEFAULT_VERSION_TABLE


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


def _applied_set(script: ScriptDirectory, revs: tuple[str, ...]) -> set[str]:
    return {s.revision for s in _between(script, revs, ())} if revs else set()


def _run_change(
    settings: Settings,
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
    script = script_directory(settings)
    finished: list = []  # the database and its revisions, once the change is done
    try:
        with _locked_connection(settings) as (url, conn):
            database = db.redact_url(url)
            where = version_table(settings, conn)
            ours = db.identity(conn)
            before = current_revisions(conn, where)
            _pending(script, before, database)  # refuses a database at a revision the code lacks
            steps = plan(script, before)
            cfg = alembic_config(settings, url=url, connection=conn, x_args=x_args)
            guard = _IndexGuard(script, conn, action, steps) if action != "stamp" else None
            progress = _Progress(script, action, on_step, guard, on_locks)
            canceller = _Canceller(url)
            dest = destination(script, before, steps)
            if action == "stamp":
                work = lambda rev, context: script._stamp_revs(dest, rev)  # noqa: E731
            elif action == "upgrade":
                work = lambda rev, context: script._upgrade_revs(dest, rev)  # noqa: E731
            else:
                work = lambda rev, context: script._downgrade_revs(dest, rev)  # noqa: E731

            def same_target(connection: Connection) -> None:
                # Before any work: env.py's connection must reach opslib's target, whose lock, backup and
                # history this change is under. And its online version table must be the one read above.
                if connection is not conn:
                    check_same_database(ours, url, connection)
                configured = _VERSION_TABLES.get(_env_key(script))
                if configured is not None and configured != where:
                    _remembered(settings, _env_key(script), configured)
                    raise ConfigError(
                        f"the project's env.py now keeps its revision in {table_name(configured)}, not "
                        f"{table_name(where)} as opslib read it; nothing was changed: run the command again"
                    )
                # Only now, with the target confirmed, may the change give the database opslib's history
                # tables (a refused change leaves it as it was); main waits on the worker meanwhile.
                db_history.ensure_schema(conn)

            def attempt() -> None:
                _run_env(
                    cfg,
                    script,
                    work,
                    destination_rev=dest,
                    on_version_apply=progress,
                    lock_timeout_ms=max(int(settings.ddl_lock_timeout_s * 1000), 1),
                    canceller=canceller,
                    on_connection=same_target,
                )

            def after_timeout() -> str:
                # Revisions before the one that timed out have committed; say which one is retried.
                now = _applied_set(script, current_revisions(conn, where))
                progress.settle(now)
                waiting = next(
                    (s.revision for s in steps if (s.revision in now) != (action == "upgrade")), target
                )
                return f"{action} {waiting}"

            captured = io.StringIO()
            # From here to the end, a signal is noted: the work under way stops at its next safe point (the
            # worker cancels its statement, a retry's wait ends), and one that comes once the work is done
            # waits for the revision to be read, so that the command still says where the database stands.
            with signals_noted() as late:
                try:
                    with _capture_alembic_output(captured), _ddl_lock_timeout(conn, settings.ddl_lock_timeout_s):
                        _retrying(settings, attempt, after_timeout, on_attempt, guard, late)
                except BaseException as err:  # noqa: BLE001 - any failure, Ctrl-C included, says where the database stands
                    after = _revisions_after_failure(conn, url, database, where)
                    if isinstance(err, InvalidInput) and set(before) == set(after):
                        raise  # refused before any work (env.py reaches another database, say): nothing changed
                    progress.settle(_applied_set(script, after))
                    # A signal cancels a concurrent build under way, which leaves its index invalid: not this run's.
                    dropped = guard.drop_after_interrupt(settings) if guard and isinstance(err, KeyboardInterrupt) else ""
                    failure = _failure(
                        action, target, database, script, before, after, steps, err, url, progress.last_called, dropped,
                        partly=guard is not None and guard.ran_autocommit(),
                    )
                    failure.output = captured.getvalue()
                    raise failure from err
                after = current_revisions(conn, where)
                progress.settle(_applied_set(script, after))
                finished[:] = [database, after]
            if late:
                raise _finished_before(late[0], action, target, database, after)
    except KeyboardInterrupt as err:  # a signal while the lock was given up and the session closed, after the work
        if not finished or getattr(err, "revisions", None) is not None:
            raise
        raise _finished_before(getattr(err, "signum", signal.SIGINT), action, target, *finished) from None
    head_ids = set(script.get_heads())
    return MigrationResult(
        action=action,
        target=target,
        database=database,
        before=before,
        after=after,
        steps=tuple(_info(s, head_ids) for s in steps),
        output=captured.getvalue(),
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


def table_name(where: tuple[str | None, str]) -> str:
    """``schema.table`` of a version table, or the bare table when it is found on the search_path."""
    schema, table = where
    return f"{schema}.{table}" if schema else table


def _describe(revs: tuple[str, ...]) -> str:
    return ", ".join(revs) if revs else "base (no revision applied)"


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


def upgrade(
    settings: Settings,
    target: str = "head",
    *,
    x_args: Sequence[str] = (),
    on_step: StepCallback | None = None,
    on_attempt: AttemptCallback | None = None,
    on_locks: LocksCallback | None = None,
) -> MigrationResult:
    """Apply pending revisions up to ``target`` (default ``head``; ``+N`` for N steps).

    One Alembic command, each revision committing on its own whatever the project's env.py says;
    ``on_step(revision, seconds, started)`` is called as each revision commits, and ``on_locks(revision,
    locks)`` with the table locks its transaction holds just before it commits.
    """
    target = _check_revision_text(target, "target revision")
    return _run_change(
        settings,
        "upgrade",
        target,
        x_args,
        lambda script, current: _plan_upgrade(script, current, target),
        lambda script, current, steps: _absolute_upgrade(script, current, steps, target),
        on_step,
        on_attempt,
        on_locks,
    )


def _absolute_upgrade(
    script: ScriptDirectory, current: tuple[str, ...], steps: list[Script], target: str
) -> str:
    """``+N`` made absolute, so that a retry does not go N further; only where the absolute target
    applies exactly the planned revisions (not across branches)."""
    if not target.startswith("+") or not steps:
        return target
    if {s.revision for s in _between(script, steps[-1].revision, current)} != {s.revision for s in steps}:
        return target
    return steps[-1].revision


def _steps(rel: str) -> int:
    try:
        n = int(rel[1:])
    except ValueError:
        raise UnknownRevision(f"{rel!r} is not a relative revision: use {rel[0]}1, {rel[0]}2, …") from None
    if n < 1:
        raise UnknownRevision(f"{rel!r}: the number of steps must be at least 1")
    return n


def downgrade(
    settings: Settings,
    target: str,
    *,
    x_args: Sequence[str] = (),
    on_step: StepCallback | None = None,
    on_attempt: AttemptCallback | None = None,
    on_locks: LocksCallback | None = None,
) -> MigrationResult:
    """Roll back to ``target``: ``-N`` steps, a revision id, or ``base``; each revision commits on its own
    (``on_step`` and ``on_locks`` as for :func:`upgrade`)."""
    target = _check_revision_text(target, "target revision")

    def destination(script: ScriptDirectory, current: tuple[str, ...], steps: list[Script]) -> str:
        if not target.startswith("-") or not steps:
            return target
        # A relative target is made absolute, so that a retry does not go N further back; only where
        # the absolute one reverses exactly the planned revisions (across a merge it would reverse
        # the other branch too, and Alembic itself refuses the relative walk as ambiguous).
        downs = _info(steps[-1], set()).down_revisions
        if len(downs) > 1:
            return target
        lower = tuple(downs)
        if {s.revision for s in _between(script, current, lower)} != {s.revision for s in steps}:
            return target
        return downs[0] if downs else "base"

    return _run_change(
        settings,
        "downgrade",
        target,
        x_args,
        lambda script, current: _plan_downgrade(script, current, target),
        destination,
        on_step,
        on_attempt,
        on_locks,
    )


def stamp(settings: Settings, target: str) -> MigrationResult:
    """Record ``target`` as the database's revision without running any migration."""
    target = _check_revision_text(target, "target revision")

    def plan(script: ScriptDirectory, current: tuple[str, ...]) -> list[Script]:
        resolve(script, target)
        return []

    return _run_change(settings, "stamp", target, (), plan, lambda script, current, steps: (target,))


def _revision_files(settings: Settings) -> set[Path]:
    """The ``.py`` files in the project's version folders now."""
    script = ScriptDirectory.from_config(alembic_config(settings))
    return {
        path.resolve()
        for location in script._version_locations
        if Path(location).is_dir()
        for path in (Path(location).rglob("*.py") if script.recursive_version_locations else Path(location).glob("*.py"))
    }


def _from_template(
    settings: Settings, make: Callable[[], Script | list[Script] | None]
) -> Script | list[Script] | None:
    """Call Alembic's ``command.revision``/``merge``, which writes the file from the project's template and
    imports it: a new revision file that is not valid Python (the message closed the template's docstring)
    is removed and refused, so that the chain never holds a file that cannot be imported. A syntax error
    anywhere else (env.py, a models module it imports) is the project's to fix: named, never removed."""
    before = _revision_files(settings)
    try:
        return make()
    except SyntaxError as err:
        broken = Path(err.filename).resolve() if err.filename else None
        if broken is not None and broken.is_file() and broken in _revision_files(settings) - before:
            broken.unlink()
            raise InvalidInput(
                f"the revision file the project's template made from this message is not valid Python "
                f"({err.msg}); it was removed: use a plainer message"
            ) from None
        raise ConfigError(f"{err.filename}, line {err.lineno}, is not valid Python: {err.msg}; fix it first") from None


def _created(result: Script | list[Script] | None, settings: Settings) -> RevisionInfo:
    made = result[0] if isinstance(result, list) else result
    if made is None:
        raise OpsError("Alembic created no revision file")
    script = script_directory(settings)  # reloaded: the new file is part of the chain now
    return _info(made, set(script.get_heads()))


# What a message must not hold: it is written into a Python docstring by the project's template, where
# triple quotes end the docstring (and what follows runs on import), a backslash starts an escape (one
# at the end swallows the closing quote), and control characters (not newlines or tabs: a message may
# have several lines) break the file or the terminal.
_UNSAFE_IN_MESSAGE = re.compile(r'"""|\'\'\'|\\|[\x00-\x08\x0b-\x1f\x7f]')  # newlines and tabs are text


def _check_message(message: str) -> str:
    if not isinstance(message, str) or not message.strip():
        raise InvalidInput('a message is required, e.g. -m "add_user_profile_table"')
    bad = _UNSAFE_IN_MESSAGE.search(message.strip())
    if bad is not None:
        what = {"\\": "a backslash"}.get(bad.group(), "triple quotes" if len(bad.group()) == 3 else "a control character")
        raise InvalidInput(
            f"revision message refused: it holds {what}, which would break out of the revision file's "
            "docstring; use plain words, e.g. -m \"add_user_profile_table\""
        )
    return message.strip()


def merge(settings: Settings, message: str, revisions: Sequence[str] = ("heads",)) -> RevisionInfo:
    """Create a merge revision joining ``revisions`` (default: all current heads)."""
    message = _check_message(message)
    script = script_directory(settings)
    if list(revisions) == ["heads"] and len(script.get_heads()) < 2:
        raise PreconditionFailed("nothing to merge: the chain has a single head")
    for rev in revisions:
        resolve(script, rev)
    cfg = alembic_config(settings)
    try:
        with _capture_alembic_output():
            made = _from_template(settings, lambda: command.merge(cfg, list(revisions), message=message))
    except (CommandError, RevisionError) as err:
        raise InvalidInput(f"merge: {err}") from err
    return _created(made, settings)


def revision(settings: Settings, message: str, *, autogenerate: bool = False) -> RevisionInfo:
    """Create a new revision file: empty, or autogenerated by comparing the models with the database.

    A vague message (the guide's ``update_database``, ``fix_stuff``) is refused before anything is written.
    """
    message = _check_message(message)
    vague = vague_message(message)
    if vague:
        raise InvalidInput(f"revision message refused: {vague}")
    script = script_directory(settings)
    if len(script.get_heads()) > 1:
        raise PreconditionFailed(
            f"the chain has several heads ({', '.join(script.get_heads())}): run `opslib merge -m MSG` first"
        )
    if not autogenerate:
        cfg = alembic_config(settings, url=OFFLINE_URL)
        with _capture_alembic_output():
            made = _from_template(settings, lambda: command.revision(cfg, message=message))
        return _created(made, settings)
    url = db.target_url(settings)
    with db.connect(url) as conn:
        current = current_revisions(conn, version_table(settings, conn))
        pending = _pending(script, current, db.redact_url(url))
        if pending:
            raise PreconditionFailed(
                f"the database is not at head ({len(pending)} revision(s) pending): run `opslib upgrade` "
                "first, autogenerate compares the models with a database at head"
            )
        cfg = alembic_config(settings, url=url, connection=conn)
        try:
            with _capture_alembic_output():
                made = _outside_event_loop(
                    lambda: _from_template(settings, lambda: command.revision(cfg, message=message, autogenerate=True)),
                    _watching(url, conn),
                )
        except (CommandError, RevisionError) as err:
            raise InvalidInput(f"revision --autogenerate: {db.scrub(str(err), url)}") from err
        except DBAPIError as err:
            raise OpsError(f"revision --autogenerate: {db.driver_message(err, url)}") from err
    return _created(made, settings)


# Alembic's offline output marks where each revision's SQL begins: "-- Running upgrade A -> B", where a
# merge names several revisions ("b1, c1 -> m").
RUNNING_MARKER = re.compile(r"^-- Running (upgrade|downgrade) (.*?) -> (.+?)[ \t]*$", re.M)


@dataclass(frozen=True)
class OfflineSQL:
    """A range rendered offline: the SQL, and the revisions that could not be rendered, with why."""

    sql: str
    unrendered: tuple[tuple[str, str], ...] = ()
    # Where the first unrendered revision starts: the revision(s) before it, fully rendered ("" at base).
    stopped_after: str | None = None


def _parse_range(settings: Settings, revision_range: str):
    """(script, FROM, TO, is a downgrade) of a ``FROM:TO`` range, refused when malformed or unknown."""
    revision_range = _check_revision_text(revision_range, "revision range")
    if revision_range.count(":") != 1:
        raise InvalidInput(f"give a revision range FROM:TO (e.g. 0003:head), not {revision_range!r}")
    start, end = (part.strip() for part in revision_range.split(":"))
    if not start or not end:
        raise InvalidInput(f"give both ends of the range FROM:TO, not {revision_range!r}")
    script = script_directory(settings)
    start_ids = tuple(s.revision for s in resolve(script, start))
    end_ids = tuple(s.revision for s in resolve(script, end))
    downgrade_ = _is_downgrade(script, start_ids, end_ids, revision_range)
    return script, start, end, downgrade_


def offline_sql(settings: Settings, revision_range: str, *, x_args: Sequence[str] = ()) -> str:
    """The SQL that would run for ``FROM:TO`` (an upgrade, or a downgrade when TO is older), without
    connecting: whole, or refused (:class:`PreconditionFailed`, exit 3) at the first revision that
    cannot be rendered offline, naming it, what it did, and the last revision fully rendered."""
    script, start, end, downgrade_ = _parse_range(settings, revision_range)
    rendered = _render(settings, script, start, end, downgrade_, x_args, resume=False)
    if rendered.unrendered:
        rev, why = rendered.unrendered[0]
        info = _safe_get_revision(script, rev)
        named = f"{rev} ({_first_line(info.doc)})" if info is not None and info.doc else rev
        last = rendered.stopped_after
        if last:
            upto = f"the last revision fully rendered is {last}: `opslib sql {start}:{last.split(', ')[-1]}` prints a whole script up to it"
        else:
            upto = "no revision of the range was fully rendered before it"
        raise PreconditionFailed(
            f"sql {revision_range}: revision {named} cannot be rendered offline: {why}; {upto}. "
            f"Run it online (`opslib {'downgrade' if downgrade_ else 'upgrade'}`), or add --partial for a "
            "script that says, in SQL comments, what it leaves out"
        )
    return rendered.sql


def script_sql(
    settings: Settings, revision_range: str, *, x_args: Sequence[str] = (), partial: bool = False
) -> OfflineSQL:
    """What ``opslib sql`` prints: a script ``psql -v ON_ERROR_STOP=1`` runs whole on a database at
    FROM, or a refusal (exit 3) naming the revision that cannot be rendered offline (see :func:`offline_sql`).

    With ``partial`` (an upgrade only), such a revision keeps its statements up to where it stopped,
    SQL comments (at the top and where it stopped) say that the rest of it is missing, and the version
    table is moved on past it so that the later revisions apply; ``unrendered`` names it for the caller
    to warn about. Such a script is not promised to run whole.
    """
    script, start, end, downgrade_ = _parse_range(settings, revision_range)
    if downgrade_ or not partial:
        return OfflineSQL(offline_sql(settings, revision_range, x_args=x_args))
    rendered = _render(settings, script, start, end, False, x_args, resume=True, bump=version_table(settings))
    if not rendered.unrendered:
        return rendered
    header = "".join(
        f"-- opslib: PARTIAL SCRIPT: revision {rev} is incomplete here: {why}\n" for rev, why in rendered.unrendered
    )
    header += (
        "-- opslib: what those revisions run past that point is NOT in this script; it may fail under\n"
        "-- psql -v ON_ERROR_STOP=1. Run them online (opslib upgrade) instead.\n\n"
    )
    return replace(rendered, sql=header + rendered.sql)


def _first_line(text: str) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


def render_pending(
    settings: Settings, current: Sequence[str], last: str, *, x_args: Sequence[str] = ()
) -> OfflineSQL:
    """The SQL of every revision from ``current`` up to ``last``, rendered in one Alembic run.

    A revision that cannot be rendered offline (it reads data, say) is left out and named; the
    rendering resumes after it, so one such revision costs one more run, not one run per revision.
    """
    script = script_directory(settings)
    if len(current) > 1:
        # Several heads applied: rendered from all of them at once. Resuming after a revision that cannot
        # render would render a sibling branch again, so such a revision ends the rendering here.
        return _render(settings, script, tuple(current), last, False, x_args, resume=False)
    return _render(settings, script, current[0] if current else "base", last, False, x_args, resume=True)


def _render(
    settings: Settings,
    script: ScriptDirectory,
    start: str | tuple[str, ...],
    end: str,
    downgrade_: bool,
    x_args: Sequence[str],
    *,
    resume: bool,
    bump: tuple[str | None, str] | None = None,
) -> OfflineSQL:
    parts: list[str] = []
    unrendered: list[tuple[str, str]] = []
    stopped_after: str | None = None
    reached: set[str] = set() if start == "base" else ({start} if isinstance(start, str) else set(start))
    while True:
        shown = start if isinstance(start, str) else ",".join(start)
        buf = io.StringIO()
        cfg = alembic_config(settings, url=OFFLINE_URL, x_args=x_args, output=buf)
        if downgrade_:
            work = lambda rev, context, end=end: script._downgrade_revs(end, rev)  # noqa: E731
        else:
            work = lambda rev, context, end=end: script._upgrade_revs(end, rev)  # noqa: E731
        try:
            with _capture_alembic_output():  # a revision's print() must not mix with the SQL
                _run_env(
                    cfg,
                    script,
                    work,
                    as_sql=True,
                    starting_rev=None if start == "base" else start,
                    destination_rev=end,
                    canceller=_Canceller(None),  # Ctrl-C stops a long chain's rendering at the next revision
                )
        except (CommandError, RevisionError) as err:
            raise InvalidInput(f"sql {shown}:{end}: {err}") from err
        except Exception as err:  # noqa: BLE001 - a revision's own code failed without a database to read
            text = buf.getvalue()
            markers = list(RUNNING_MARKER.finditer(text))
            lines = str(err).strip().splitlines()
            # A revision's own message may quote a URL from the environment: never its password.
            why = db.redact_urls_in(f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__)
            if not markers:  # before any revision: the project's env.py itself failed
                raise PreconditionFailed(
                    f"sql {shown}:{end}: the project's env.py failed offline: {why}"
                ) from err
            failed = markers[-1].group(3)
            if isinstance(err, AttributeError) and "NoneType" in str(err):
                why += " (it reads data, which offline mode does not have)"
            unrendered.append((failed, why))
            if stopped_after is None:
                stopped_after = markers[-1].group(2).strip()
            part = text[: markers[-1].start()]
            if bump is not None:  # keep what it rendered, and move the version on past it
                part = text + _past_unrendered(failed, markers[-1].group(2), why, bump)
            # env.py's one transaction was left open at the failure: close it, as the rest is rendered apart.
            if len(re.findall(r"^BEGIN;$", part, re.M)) > len(re.findall(r"^COMMIT;$", part, re.M)):
                part += "COMMIT;\n\n"
            parts.append(part)
            if not resume or failed == end or _resolves_to(script, end, failed):
                return OfflineSQL("".join(parts), tuple(unrendered), stopped_after)
            # Resume from every head reached so far (the failed revision counted as passed), so that a
            # sibling branch already rendered is not rendered again.
            reached |= {mk.group(3).split(", ")[-1] for mk in markers}
            start = _heads_of(script, reached)
            continue
        parts.append(buf.getvalue())
        return OfflineSQL("".join(parts), tuple(unrendered), stopped_after)


def _past_unrendered(revision: str, previous: str, why: str, where: tuple[str | None, str]) -> str:
    """SQL comments saying where a revision stopped rendering, then its version table update."""
    schema, table = where
    name = f"{schema}.{table}" if schema else table
    if previous and "," in previous:  # a merge: the version rows are Alembic's to rewrite
        move = f"-- (the version table is left to Alembic: {revision} merges {previous})\n"
    elif previous:
        move = f"UPDATE {name} SET version_num='{revision}' WHERE {name}.version_num = '{previous}';\n"
    else:
        move = f"INSERT INTO {name} (version_num) VALUES ('{revision}');\n"
    return (
        f"\n-- opslib: INCOMPLETE: revision {revision} could not be rendered offline past this point: {why}.\n"
        "-- Whatever it runs after this point (tables, columns, data) is NOT in this script; run it online\n"
        f"-- (opslib upgrade {revision}). The version table is moved on past it so the later revisions apply.\n{move}\n"
    )


def _heads_of(script: ScriptDirectory, revisions: set[str]) -> str | tuple[str, ...]:
    """The heads of the history made of ``revisions`` and all their ancestors."""
    passed: set[str] = set()
    for r in revisions:
        if r not in passed:  # an ancestor of one already walked: its own ancestors are in ``passed`` too
            passed |= {s.revision for s in _between(script, r, ())}
    heads = tuple(sorted(r for r in passed if not (script.get_revision(r).nextrev & passed)))
    return heads[0] if len(heads) == 1 else heads


def _resolves_to(script: ScriptDirectory, name: str, revision: str) -> bool:
    try:
        return {s.revision for s in resolve(script, name)} == {revision}
    except OpsError:
        return False


def _is_downgrade(script: ScriptDirectory, start: tuple[str, ...], end: tuple[str, ...], text: str) -> bool:
    if start == end:
        raise InvalidInput(f"the range {text!r} is empty: FROM and TO are the same revision")
    if not start:
        return False
    if not end:
        return True
    below_end = {s.revision for s in _between(script, end, ())}
    if set(start) <= below_end:
        return False
    below_start = {s.revision for s in _between(script, start, ())}
    if set(end) <= below_start:
        return True
    raise InvalidInput(f"the range {text!r} does not follow one line of history")


def _plan_upgrade(script: ScriptDirectory, current: tuple[str, ...], target: str) -> list[Script]:
    """The revisions an upgrade to ``target`` applies, oldest first; raises before any change when it cannot."""
    if target.startswith("+"):
        pending = _upgrade_path(script, tuple(script.get_heads()), current)
        n = _steps(target)
        if n > len(pending):
            raise PreconditionFailed(f"cannot upgrade {target}: only {len(pending)} revision(s) pending")
        return pending[:n]
    upper = tuple(s.revision for s in resolve(script, target))
    try:
        steps = _upgrade_path(script, upper, current)
    except (RevisionError, CommandError):
        steps = None
    # Alembic's walk to a revision already passed is empty, as it is to the current one: only the
    # latter is "nothing to do".
    below = _applied_set(script, current) - set(current)
    if steps is None or (not steps and set(upper) <= below):
        raise UnknownRevision(
            f"{target!r} is not ahead of the database's revision {_describe(current)}: "
            "use `opslib downgrade` to go back"
        )
    return steps


def _plan_downgrade(script: ScriptDirectory, current: tuple[str, ...], target: str) -> list[Script]:
    """The revisions a downgrade to ``target`` reverses, newest first; raises before any change when it cannot."""
    if not current:
        raise PreconditionFailed("nothing to roll back: the database is at base (no revision applied)")
    applied = list(reversed(_between(script, current, ())))  # newest first
    if target.startswith("-"):
        n = _steps(target)
        if len(current) > 1:
            raise PreconditionFailed(
                f"the database is at several heads ({', '.join(current)}): downgrade to a revision id"
            )
        if n > len(applied):
            raise PreconditionFailed(f"cannot downgrade {target}: only {len(applied)} revision(s) applied")
        try:
            return _downgrade_path(script, target, current)
        except (RevisionError, CommandError) as err:
            raise UnknownRevision(
                f"downgrade {target}: {err} (Alembic's walk); the database is unchanged at {_describe(current)}: "
                "downgrade to a revision id"
            ) from None
    if target == "base":
        return _downgrade_path(script, "base", current)
    lower = resolve(script, target)
    lower_ids = {s.revision for s in lower}
    if not lower_ids <= {s.revision for s in applied}:
        raise UnknownRevision(
            f"{target!r} is not behind the database's revision {_describe(current)}: "
            "use `opslib upgrade` to go forward"
        )
    try:
        return _downgrade_path(script, target, current)
    except (RevisionError, CommandError) as err:
        raise UnknownRevision(f"cannot downgrade to {target!r} from {_describe(current)}: {err}") from None


def plan(settings: Settings, action: str, target: str) -> tuple[tuple[str, ...], list[RevisionInfo]]:
    """What ``upgrade`` or ``downgrade`` to ``target`` would do now: the current revisions and the steps.

    Reads only; raises as the verb itself would (unknown revision, nothing to roll back, ...).
    """
    target = _check_revision_text(target, "target revision")
    script = script_directory(settings)
    url = db.target_url(settings)
    with db.connect(url) as conn:
        current = current_revisions(conn, version_table(settings, conn))
    _pending(script, current, db.redact_url(url))
    steps = (_plan_upgrade if action == "upgrade" else _plan_downgrade)(script, current, target)
    head_ids = set(script.get_heads())
    return current, [_info(s, head_ids) for s in steps]


@dataclass(frozen=True)
class DeployPlan:
    """What a deploy to ``target`` does, worked out once: its checks judge it and its steps reuse it."""

    database: str
    target: str
    current: tuple[str, ...]
    heads: tuple[str, ...]
    pending: tuple[RevisionInfo, ...]
    sql: OfflineSQL = field(default_factory=lambda: OfflineSQL(""))

    @property
    def last(self) -> str | None:
        """The revision the deploy ends at, or None when nothing is pending."""
        return self.pending[-1].revision if self.pending else None


def deploy_plan(settings: Settings, target: str = "head", *, x_args: Sequence[str] = ()) -> DeployPlan:
    """Read where the database stands and plan an upgrade to ``target``, with its SQL rendered offline.

    Reads only; raises as :func:`upgrade` would (unknown revision, a database ahead of the code).
    """
    target = _check_revision_text(target, "target revision")
    script = script_directory(settings)
    url = db.target_url(settings)
    with db.connect(url) as conn:
        current = current_revisions(conn, version_table(settings, conn))
    database = db.redact_url(url)
    _pending(script, current, database)
    head_ids = set(script.get_heads())
    pending = tuple(_info(s, head_ids) for s in _plan_upgrade(script, current, target))
    plan_ = DeployPlan(database, target, current, tuple(sorted(head_ids)), pending)
    if not pending:
        return plan_
    return replace(plan_, sql=render_pending(settings, current, pending[-1].revision, x_args=x_args))


def has_real_downgrade(info: RevisionInfo) -> bool:
    """False when a revision's downgrade() does nothing (only ``pass``, ``...`` or a docstring) or just raises."""
    try:
        tree = ast.parse(Path(info.path).read_text())
    except (OSError, SyntaxError):
        return True  # cannot tell: let Alembic try, and report what happens
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "downgrade":
            body = [
                stmt
                for stmt in node.body
                if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant))
                and not isinstance(stmt, ast.Pass)
            ]
            return bool(body) and not all(isinstance(stmt, ast.Raise) for stmt in body)
    return False


def compare_models(settings: Settings) -> tuple[str, str]:
    """Whether the database matches the project's models: ``(pass|fail|skip, detail)``.

    Runs Alembic's ``check`` (autogenerate's comparison) through the project's env.py; a project
    whose env.py gives no ``target_metadata`` has no models to compare, which is a skip.
    """
    url = db.target_url(settings)
    with db.connect(url) as conn:
        cfg = alembic_config(settings, url=url, connection=conn)
        try:
            with _capture_alembic_output():
                diffs = _model_differences(cfg, script_directory(settings), _watching(url, conn))
        except CommandError as err:
            if "MetaData" in str(err):
                return "skip", "the project's env.py has no target_metadata to compare"
            return "fail", db.scrub(str(err), url)
    if diffs:
        return "fail", db.scrub(f"New upgrade operations detected: {diffs}".splitlines()[0], url)
    return "pass", "no differences between the models and the database"


def _model_differences(cfg: Config, script: ScriptDirectory, canceller: _Canceller) -> list:
    """What autogenerate finds between the models and the database: Alembic's ``check`` command
    (``alembic.command.check``), run on the script directory already loaded (the command loads every
    revision file again, a tenth of a second on a long chain)."""
    options = dict(
        message=None,
        autogenerate=True,
        sql=False,
        head="head",
        splice=False,
        branch_label=None,
        version_path=None,
        rev_id=None,
        depends_on=None,
    )
    revision_context = RevisionContext(cfg, script, options)

    def retrieve_migrations(rev, context):
        revision_context.run_autogenerate(rev, context)
        return []

    _run_env(
        cfg,
        script,
        retrieve_migrations,
        canceller=canceller,
        template_args=revision_context.template_args,
        revision_context=revision_context,
    )
    return [diff for ops in revision_context.generated_revisions[-1].upgrade_ops_list for diff in ops.as_diffs()]
