"""The recorder behind every runbook: steps, their order, and the run's record.

A runbook's first code cell is ``run = runbook.start("deploy", globals())`` (see :mod:`opslib.runbook`);
the run it returns is its runbook's workflow (:mod:`opslib.workflows`), a :class:`Run` whose steps are
methods decorated with :func:`step`. A step is recorded (name, start, duration, outcome) in the run's
sidecar, rewritten after every step; the workflow lists its step methods in order (:attr:`Run.steps`),
so the order holds in every mode (headless, papermill, JupyterLab, plain Python); when a
step fails or is out of order, the run ends there: the record is finished with the outcome and the
database's revision, sealed, and the error raised so the notebook (and papermill) stops.

The same code runs cell by cell in JupyterLab, under plain papermill, and under ``opslib run``
(which also keeps the executed notebook and writes the ledger line, see :mod:`opslib.runner`).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

from opslib import audit, lazy, liveness, params, signatures
from opslib.approval import outside_approvals
from opslib.config import Settings, is_runbook_template, load_settings, runbooks_dir
from opslib.display import Section, show_now
from opslib.errors import Interrupted, InvalidInput, OpsError, PreconditionFailed, StepOutOfOrder
from opslib.outcome import Outcome, outcome_of
from opslib.record import Database, RunRecord, Step, revisions_text
from opslib.runcontext import RunContext
from opslib.signals import signals_held

# Loaded at first use: the registry is read by processes that never run a step (see opslib.lazy).
sa = lazy.module("sqlalchemy")
db = lazy.module("opslib.db")
migrate = lazy.module("opslib.migrate")
sealing = lazy.module("opslib.sealing")
run_history = lazy.module("opslib.history")

SAVE_EVERY_S = 0.5  # how often the sidecar is rewritten while revisions are being applied


def _message_of(err: BaseException) -> str:
    if isinstance(err, (OpsError, Interrupted)):
        return err.message
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    return f"unexpected error: {type(err).__name__}: {err}"


class _Signals:
    """SIGTERM (a cancelled job, a stopped container) ends a run like Ctrl-C does, as ``interrupted``.

    During a step the signal raises :class:`Interrupted` at once: the step stops, and the record is
    sealed with where the database stands. Between steps (an operator reading a cell's output, a
    kernel told to stop) the run is sealed as interrupted there and then, and the signal is passed on
    to the handler from before the run (by default, the process ends). While a record is being sealed,
    SIGINT and SIGTERM wait (:meth:`held`): a second Ctrl-C cannot leave it half-sealed.
    """

    in_step = 0
    stopping = False
    run: "Run | None" = None
    saved: object = None

    @classmethod
    def stop_on_sigterm(cls) -> None:
        """Install the handler (in the main thread only: Python allows signal handlers nowhere else)."""
        cls.stopping, cls.run = False, None
        if threading.current_thread() is threading.main_thread() and cls.saved is None:
            cls.saved = signal.signal(signal.SIGTERM, cls._on_sigterm)

    @classmethod
    def restore(cls) -> None:
        """Give SIGTERM back its handler from before the run."""
        if cls.saved is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, cls.saved)
            cls.saved = None

    @classmethod
    def _on_sigterm(cls, signum, frame) -> None:
        if cls.in_step:
            if not cls.stopping:
                cls.stopping = True  # once: a second signal must not break off the stopping of the first
                raise Interrupted(signum)
            return
        if cls.run is not None and not cls.run.ended:
            cls.run._end(Interrupted(signum))  # nobody may be there to run another step: seal now
        cls.restore()
        signal.raise_signal(signum)


def step(label: str | None = None, repeatable: bool = False) -> Callable:
    """Decorate a Run method as a recorded step; a failure ends the run and is re-raised.

    It is recorded under ``label`` (default: the method's name). Its place is the workflow's
    :attr:`Run.steps`, the step methods in order: each needs the one before it to have run (succeeded, or
    skipped as not needed). A step runs once unless ``repeatable`` (a step that only reads): run again after
    it succeeded or was skipped (a cell run twice by accident), it shows its result again, is not run or
    recorded again, and the run goes on. A step out of order refuses: the run ends there as ``refused``
    (exit 3) having changed nothing, naming the first step missing by its section's title.
    """

    def decorate(fn: Callable) -> Callable:
        name = label or fn.__name__

        @functools.wraps(fn)
        def wrapper(self: "Run", *args, **kwargs):
            if name in self.done and not repeatable:
                return self._shown_again(name)
            self._require_open(name)
            entry = self.record.step(name, audit.iso(audit.now()))
            started = time.perf_counter()
            _Signals.in_step += 1
            try:
                self._require_order(fn.__name__, repeatable, entry)
                self._save()
                result = fn(self, *args, **kwargs)
            except BaseException as caught:
                _Signals.in_step -= 1
                if self.ended:  # sealed already (a signal passed on after the summary): nothing to add
                    raise
                # A missing privilege is configuration (exit 2) when this run has changed nothing yet.
                err = (db.config_error_of(caught) if not self._changed_anything() else None) or caught
                if getattr(err, "output", ""):  # what the migrations printed or logged before the failure
                    self._keep_output(name, err.output)
                entry.outcome = outcome_of(err)[0]
                entry.duration_s = round(time.perf_counter() - started, 3)
                if self._end(err) == signal.SIGTERM:
                    signal.raise_signal(signal.SIGTERM)  # told to stop while sealing: now it may
                self._await_seal()  # in JupyterLab: sealed now, by the autosave, before the error is shown
                if err is not caught:
                    raise err from None
                raise
            _Signals.in_step -= 1
            self.done[name] = (result, entry.started_at)
            if self.ended:  # the summary sealed the run, its own step included
                held, self.held_signal = self.held_signal, None
                if held is not None:
                    signal.raise_signal(held)  # the signal that waited for the seal now takes effect
                return result
            skipped = isinstance(result, Section) and result.skipped
            entry.outcome = Outcome.SKIPPED if skipped else Outcome.SUCCEEDED
            entry.duration_s = round(time.perf_counter() - started, 3)
            self._save()
            return result

        wrapper.step_name = name
        return wrapper

    return decorate


class Run:
    """One execution of a runbook: its settings, validated parameters and record.

    A workflow (see :mod:`opslib.workflows`) declares its step methods in order in :attr:`steps`; every
    run begins with :meth:`validate` and ends with :meth:`summary`.
    """

    # What a workflow declares of its runbook (see opslib.workflows): its name and purpose, its parameters,
    # its step methods between validate and summary in the order they must run, and how the records and
    # the production rules treat it.
    runbook = ""
    about = ""
    parameters: tuple[params.Param, ...] = ()
    steps: tuple[str, ...] = ()
    changes_database = True
    backup_gated = False
    allowed_in_production = True
    listed = 100  # where `opslib runbooks` lists it: opslib's own first, in the guide's order
    # A runbook name no workflow declares: the run's first step refuses it (recorded, exit 2).
    unknown: str | None = None

    def __init_subclass__(cls, **kwargs):
        """A workflow's step methods are exactly validate, its ``steps`` and summary: a step left out of the order
        would run unordered, and a name with no step would refuse the summary for ever."""
        super().__init_subclass__(**kwargs)
        methods = {name for name in dir(cls) if getattr(getattr(cls, name, None), "step_name", None)}
        if methods != set(cls.step_order()) or len(set(cls.steps)) != len(cls.steps):
            raise TypeError(
                f"{cls.__name__}.steps must list each of its step methods once, in order (besides validate and "
                f"summary): steps lists {', '.join(cls.steps) or 'none'}; its step methods are "
                f"{', '.join(sorted(methods - {'validate', 'summary'})) or 'none'}"
            )

    @classmethod
    def check_values(cls, values: dict) -> None:
        """The runbook's own rules across its parameters, raising :class:`InvalidInput`; none by default."""

    @classmethod
    def checked_parameters(cls, values: Mapping[str, Any], env: str) -> dict[str, Any]:
        """The parameters, complete and checked: each against its declaration (exit 2), then the rules
        across them (exit 2), then what the environment forbids (exit 3)."""
        if cls.unknown:
            raise InvalidInput(cls.unknown)
        checked = params.validate(cls.runbook, cls.parameters, values)
        cls.check_values(checked)
        params.check_environment(cls.runbook, checked, env, cls.allowed_in_production)
        return checked

    def __init__(self, settings: Settings, values: dict, record: RunRecord, stem: str, under_runner: bool):
        self.settings = settings
        self.params = values
        self.record = record
        self.stem = stem
        self.under_runner = under_runner
        self.ended = False
        self.held_signal: int | None = None
        self.live: liveness.LiveMark | None = None
        self.target: migrate.Target | None = None  # the database and project, resolved by the preflight
        self.url = None
        self.database = None
        self.run_lock: db.RunLock | None = None
        # Each step that succeeded or was skipped: what it showed and when it began, to show it again.
        self.done: dict[str, tuple[Any, str]] = {}

    # --- bookkeeping ------------------------------------------------------------------------------

    @property
    def record_path(self) -> Path:
        """The run's sidecar JSON."""
        return audit.sidecar_path(self.settings.records_dir, self.stem)

    def _save(self) -> None:
        audit.write_sidecar(self.settings.records_dir, self.stem, self.record)

    def _require_open(self, name: str) -> None:
        if self.ended:
            again = (
                f"`opslib open {self.runbook}` makes a new run"
                if self.record.mode == "interactive"
                else f"run the cells again from the one that calls runbook.start(\"{self.runbook}\", …)"
                + (f" in the section “{title}”" if (title := section_title(self.runbook, "runbook.start")) else "")
            )
            raise PreconditionFailed(f"this run has ended ({self.record.outcome}); to {name} again, start a new run: {again}")

    def _require_order(self, method: str, repeatable: bool, entry: Step) -> None:
        """Refuse a step run before the one it follows (see :func:`step`), naming the first step missing."""
        done = {s.name: s.outcome for s in self.record.steps if s is not entry}
        order = self.step_order()
        before = order[: order.index(method)] if method in order else ()
        missing = next((m for m in before if not self._passed(done, self._label_of(m))), None)
        if missing is not None:  # the earliest step not run: "preflight first", not "backup first"
            raise StepOutOfOrder(
                f"{self.runbook}: {self._label_of(method)} needs the {self._label_of(missing)} step first "
                f"({self._cell_of(missing)}); nothing was changed, and this run ends here: start a new run and "
                "run its cells in order"
            )

    @classmethod
    def step_order(cls) -> tuple[str, ...]:
        """Every step method of this workflow, in the order they run."""
        return ("validate", *cls.steps, "summary")

    @classmethod
    def _label_of(cls, method: str) -> str:
        """The name a step method is recorded under."""
        return getattr(getattr(cls, method, None), "step_name", method)

    @staticmethod
    def _passed(done: Mapping[str, Outcome], step_name: str) -> bool:
        return done.get(step_name) in (Outcome.SUCCEEDED, Outcome.SKIPPED)

    def _shown_again(self, name: str) -> Any:
        """A finished step's result, shown again for a cell run twice: the step is not run again."""
        result, started_at = self.done[name]
        if isinstance(result, Section):
            return result.again(f"done at {started_at}; shown again, not run again")
        return result

    def _cell_of(self, method: str) -> str:
        """The cell that runs a step, as an operator finds it in the notebook: by its section's title."""
        if method == "validate":
            title = section_title(self.runbook, "runbook.start")
            return f"the cell that calls runbook.start in the section “{title}”" if title else "the cell that calls runbook.start"
        title = section_title(self.runbook, f"run.{method}(")
        where = f"the cell `run.{method}()`"
        return f"{where} in the section “{title}”" if title else where

    def _revisions_now(self) -> list[str] | None:
        return migrate.revisions_now(self.target or self.settings, self.record.version_table)

    def _finish(self, err: BaseException | None = None) -> None:
        outcome, code = outcome_of(err)
        self.record.end(outcome, code, None if err is None else _message_of(err), audit.iso(audit.now()))
        for entry in self.record.steps:  # a step the signal caught between its end and its bookkeeping
            if entry.outcome is Outcome.RUNNING:
                entry.outcome = outcome
        self._save()  # the outcome is on disk before the database is asked anything
        if self.record.database is not None:
            self.record.revisions_after = self._revisions_now()
            if outcome is not Outcome.INVALID:  # bad input concerns no database: none is written to
                self._record_run_in_database()
        self.ended = True
        self._release_lock()
        self._save()

    def _close(self) -> None:
        """Seal an ended run: its ledger entry vouches for the sidecar as it is now, so nothing may change after."""
        # The last write of this process: a run may be sealed by another (a JupyterLab save) only from now.
        self.record.closed_at = audit.iso(audit.now())
        if self.under_runner:  # `opslib run` seals it, with its notebook; `opslib open`, when it is saved
            self._save()
        else:
            sealing.seal(self.settings, Path(self.settings.records_dir), self.stem, self.record)
        if self.live is not None and self.record.mode != "interactive":
            self.live.release(remove=not self.under_runner)
        # An interactive run's kernel keeps its hold until it exits: the run is sealed when the operator
        # saves the notebook (or `opslib audit seal`), and becomes abandoned only once the kernel is gone.

    def _end(self, err: BaseException | None = None) -> int | None:
        """End and seal the run with SIGINT and SIGTERM held off; return the first signal that waited."""
        with signals_held() as caught:
            try:
                self._finish(err)
            except Interrupted:  # signalled twice while the database was slow to answer: sealed without it
                self.record.revisions_after = None
                self.record.database_history = "not written: the run was interrupted again while it was sealed"
                self.ended = True
                self._save()
            self._close()
        _Signals.restore()
        _Signals.run = None
        return caught[0] if caught else None

    def _identify(self, lock: bool = True) -> list[tuple[str, object]]:
        """Connect, record which database this is, and return its identity as facts to show; with
        ``lock``, take the run lock on it (a run that only reads the target, a rehearsal, does not)."""
        self.target = migrate.Target(self.settings)  # resolved once: every step works on this one
        self.url = self.target.url
        # Recorded before the lock: whoever seals this run if it dies reads the revision from this table.
        table = self.target.version_table()
        with db.connect(self.url) as conn:
            version, _ = db.server_version(conn)
            fingerprint = db.fingerprint(conn)
            # Read without the lock too: a run the lock turns away still records where the database stood.
            self.record.revisions_before = list(migrate.current_revisions(conn, table))
        host = self.url.host or self.url.query.get("host")
        self.database = self.url.database
        self.record.database = Database(host, self.url.port, self.url.database)
        self.record.alembic_ini = str(Path(self.settings.alembic_ini).resolve())
        self.record.version_table = list(table)
        self._save()
        if lock:
            self._take_lock()  # one run at a time on a database: a second one stops here, exit 4
        with db.connect(self.url) as conn:
            current = list(migrate.current_revisions(conn, table))
        self.record.revisions_before = current
        self.record.fingerprint = fingerprint
        self._save()
        return [
            ("fingerprint", fingerprint),
            ("database", self.url.database),
            ("server", f"{host}:{self.url.port or 5432}" if self.url.host else f"socket {host}"),
            ("PostgreSQL", version),
            ("environment", self.settings.env),
            ("operator", self.settings.operator),
            ("current revision", revisions_text(current)),
        ]

    def _record_run_in_database(self) -> None:
        """Append this run's row to the database's own history; a database out of reach keeps the files' record."""
        finished = replace(self.record, finished_at=self.record.finished_at or audit.iso(audit.now()))
        try:
            with db.connect(self.url or db.target_url(self.settings)) as conn:
                run_history.record_run(conn, finished)
        except (OpsError, sa.exc.DBAPIError) as err:
            self.record.database_history = f"not written: {_message_of(err)}"
        run_history.set_current_run_id(None)

    def _take_lock(self) -> None:
        """Hold the opslib lock on the target until the run ends, without waiting for it."""
        self.run_lock = db.hold_run_lock(self.url, f"opslib {self.runbook} run {self.record.run_id}")
        run_history.set_current_run_id(self.record.run_id)  # revision events in the database name this run

    def _release_lock(self) -> None:
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    def _changed_anything(self) -> bool:
        """Whether this run has changed its database so far: a revision committed, data changed, a schema recreated."""
        revision_steps = ("upgrade ", "downgrade ")
        return bool(
            self.record.data_changes
            or self.record.schema_recreated
            or any(s.outcome is Outcome.SUCCEEDED and s.name.startswith(revision_steps) for s in self.record.steps)
        )

    def _attempt_recorder(self) -> Callable:
        """Record each attempt that gave up on the lock timeout, as a step of its own."""

        def on_attempt(what: str, attempt: int, error: str) -> None:
            self.record.step(
                f"{what} attempt {attempt}",
                audit.iso(audit.now()),
                duration_s=self.settings.ddl_lock_timeout_s,
                outcome=Outcome.LOCK_TIMEOUT,
                error=error,
            )
            self._save()

        return on_attempt

    def _steps_recorder(self, verb: str) -> Callable:
        """Record each revision as a step of its own, as it commits.

        The sidecar is rewritten at most every SAVE_EVERY_S seconds here (and always when the step
        ends): rewriting it for each of 200 quick revisions would cost more than applying them.
        """
        saved = [time.monotonic()]

        def on_step(info: migrate.RevisionInfo, seconds: float, started: float) -> None:
            self.record.step(
                f"{verb} {info.revision}",
                audit.iso(datetime.fromtimestamp(started, timezone.utc)),
                duration_s=round(seconds, 3),
                outcome=Outcome.SUCCEEDED,
            )
            if time.monotonic() - saved[0] >= SAVE_EVERY_S:
                self._save()
                saved[0] = time.monotonic()

        return on_step

    def _keep_output(self, step_name: str, output: str) -> None:
        """Keep what the migrations printed or logged during a step, in full, in the record."""
        self.record.migration_output = {**(self.record.migration_output or {}), step_name: output}

    @step("parameters")
    def validate(self, runbook: str, namespace: Mapping[str, Any], reload_settings: bool = False) -> None:
        """Validate the parameters and the environment's rules for this runbook (the run's first step)."""
        if reload_settings:
            load_settings()  # raises the configuration error, now recorded as this step's failure
        if self.unknown:
            raise InvalidInput(self.unknown)
        values = params.validate(runbook, self.parameters, params.from_namespace(self.parameters, namespace))
        self.check_values(values)
        self.params = values
        self.record.parameters = values
        env_name = values["database_url_env"]
        url = os.environ.get(env_name)
        if not url and env_name != "DATABASE_URL":
            raise InvalidInput(
                f"{runbook}: the environment variable {env_name} (database_url_env) is not set"
            )
        if url is not None and not url.strip():
            raise InvalidInput(f"{runbook}: the environment variable {env_name} (database_url_env) is set but empty")
        if url:
            db.parse_url(url, source=env_name)  # a malformed URL is refused here, before any connection
            self.settings = replace(self.settings, database_url=url, url_source=env_name)
        # DATABASE_URL unset: the settings' own rule stands (the project's alembic.ini URL, else the embedded server).
        params.check_environment(runbook, values, self.settings.env, self.allowed_in_production)
        self._check_inputs()

    def _check_inputs(self) -> None:
        """What a runbook needs besides its parameters (an environment variable, say), checked before any
        connection: raise :class:`InvalidInput` (exit 2). None by default."""

    @step()
    def summary(self) -> Section:
        """End the run as succeeded, seal it, and show what it did."""
        r = self.record
        own = r.steps[-1]  # this step seals the run: it is written as done, with its time so far
        own.outcome = Outcome.SUCCEEDED
        own.duration_s = round((audit.now() - datetime.fromisoformat(own.started_at.replace("Z", "+00:00"))).total_seconds(), 3)
        self.held_signal = self._end()
        facts = [
            ("outcome", str(r.outcome)),
            ("database", self.database),
            ("revision before", revisions_text(r.revisions_before)),
            ("revision after", revisions_text(r.revisions_after)),
            ("backup", Path(r.backup.path).name if r.backup else "none"),
            ("record", self.record_path.name),
        ]
        if r.schema_recreated:
            facts.insert(4, ("schema public", f"recreated: {r.schema_recreated.reason}"))
        rows = [
            {"step": s.name, "outcome": str(s.outcome), "seconds": s.duration_s}
            for s in r.steps
            if s.name != "summary"
        ]
        shown = Section(f"{self.runbook.capitalize()} summary", str(r.outcome), facts, rows)
        if not self._sealed_by_lab():
            return shown
        # In JupyterLab the summary is shown now, before the seal mark, so that the save that seals the run
        # holds it; the cell then shows nothing more of its own.
        show_now(shown)
        self._await_seal()
        return None

    def _sealed_by_lab(self) -> bool:
        """Whether this run is sealed by a JupyterLab save of its notebook (a run of `opslib open`)."""
        return self.under_runner and self.record.mode == "interactive"

    def _await_seal(self) -> None:
        """In JupyterLab, once the run has ended: show the seal mark and wait in this cell for the autosave
        that seals it (see :mod:`opslib.autoseal`), so nobody has to remember to save."""
        if self._sealed_by_lab() and self.ended:
            from opslib import autoseal  # noqa: PLC0415 -- IPython's display, only in a kernel

            autoseal.await_seal(Path(self.settings.records_dir), self.stem, self.record.run_id, str(self.record.outcome))

    def __repr__(self) -> str:
        return repr(self._parameters_section())

    def _repr_html_(self) -> str:
        return self._parameters_section()._repr_html_()

    def _parameters_section(self) -> Section:
        rows = [{"parameter": k, "value": v} for k, v in self.params.items()]
        facts = [
            ("run id", self.record.run_id),
            ("environment", self.settings.env),
            ("record", self.record_path.name),
        ]
        return Section(f"{self.runbook.capitalize()} run", "parameters valid", facts, rows)


def section_title(runbook: str, code: str) -> str | None:
    """The title of the section (its markdown heading) whose code cell holds ``code``, in the runbook's
    template; None when the template cannot be read or holds no such cell."""
    try:
        cells = json.loads((runbooks_dir() / f"{runbook}.ipynb").read_text(encoding="utf-8"))["cells"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    title = None
    for cell in cells:
        source = "".join(cell.get("source") or [])
        if cell.get("cell_type") == "markdown" and source.lstrip().startswith("#"):
            title = source.lstrip().splitlines()[0].lstrip("#").strip()
        elif cell.get("cell_type") == "code" and code in source:
            return title
    return None


def _refuse_a_notebook_that_is_not_the_run(runbook: str, stem: str | None, interactive: bool) -> None:
    """In JupyterLab, a runbook runs only from its run's own notebook (made by `opslib open`), and only once:
    never from a template in the runbooks folder, never from another notebook of a Lab opened for a run,
    and never again after a kernel restart (the first kernel's record stays as it was)."""
    session = os.environ.get("JPY_SESSION_NAME")  # the notebook's path, set by jupyter_server for its kernels
    again = f"`opslib open {runbook}` makes a new run with its own notebook"
    if session:
        notebook = Path(session).resolve()
        if is_runbook_template(notebook):
            raise InvalidInput(
                f"{notebook.name} is a runbook template: templates never run and never change; {again}"
            )
        if stem is not None and interactive and notebook.name != f"{stem}.ipynb":
            raise InvalidInput(f"this JupyterLab was opened for run {stem}, not for {notebook.name}; {again}")
    if stem is None or not interactive:
        return
    try:
        settings = load_settings()
    except OpsError:
        return  # begin records the configuration error itself
    earlier = audit.read_sidecar(settings.records_dir, stem)
    if earlier and (earlier.get("steps") or earlier.get("outcome") != str(Outcome.RUNNING)):
        raise PreconditionFailed(
            f"run {stem} has already started (in this kernel or one before it), and its record stays as it "
            f"was left; {again}"
        )


def begin(runbook: str, namespace: Mapping[str, Any], workflow: type[Run]) -> Run:
    """Begin a run of ``workflow``: validate the parameters found in the notebook's namespace, before
    any connection (invalid ones end the run at once, with its record written). A runbook no workflow
    declares is begun as a :class:`Run` whose ``unknown`` says so: its first step refuses it."""
    context = RunContext.given()  # the run its driver named (`opslib run`, `opslib open`), or None: a run of its own
    started = context.started if context else audit.now()
    run_id = context.run_id if context else audit.new_run_id()
    stem = context.stem if context else audit.record_stem(runbook, run_id, started)
    under_runner = context is not None
    interactive = bool(context) and context.mode == "interactive"
    _refuse_a_notebook_that_is_not_the_run(runbook, stem if under_runner else None, interactive)
    # Every session the run opens (its lock, the migrations, pg_dump) carries its name: the sessions of a
    # run that died can be found and ended before its record is sealed.
    os.environ["PGAPPNAME"] = audit.application_name(runbook, run_id)
    _Signals.stop_on_sigterm()
    try:
        settings = load_settings()
    except OpsError:
        settings = Settings()  # to record the refusal in the default folders
        bad = True
    else:
        bad = False
    audit.ensure_records_dir(settings.records_dir)  # no folder to record in: one line, nothing done
    record = audit.new_record(runbook, run_id, started, operator=settings.operator, env=settings.env,
                              approvals=outside_approvals(settings.approved_by, settings.approval_ref))
    record.changes_database, record.backup_gated = workflow.changes_database, workflow.backup_gated
    run = workflow(settings, {}, record, stem, under_runner)
    # Held for the run's life, before its first sidecar: a record whose mark nobody holds was abandoned.
    run.live = liveness.hold_live_mark(settings.records_dir, stem)
    if not under_runner:  # `opslib run` and `opslib open` wrote the start entry before the kernel began
        audit.append_started(settings.records_dir, stem, record, settings.ledger_witness,
                             signatures.ledger_signer(settings)[0])
    _Signals.run = run
    run.validate(runbook, namespace, reload_settings=bad)
    return run
