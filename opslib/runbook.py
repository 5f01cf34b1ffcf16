"""The steps behind the runbooks: every code cell of ``runbooks/*.ipynb`` is one call into this module.

A runbook's first code cell is ``run = runbook.start("deploy", globals())``: it validates the
parameters (before any connection) and returns the run, whose methods are the runbook's steps.
Each step is recorded (name, start, duration, outcome) in the run's sidecar, rewritten after every
step; when a step fails, the run ends there: the record is finished with the outcome and the
database's revision, then the error is raised so the notebook (and papermill) stops. Nothing here
prints a password: the URL comes from the environment variable the parameters name.

The same code runs cell by cell in JupyterLab, under plain papermill, and under ``opslib run``
(which also keeps the executed notebook and writes the ledger line, see :mod:`opslib.runner`).
"""

from __future__ import annotations

import functools
import gc
import os
import signal
import threading
import time
from dataclasses import replace
from datetime import timedelta
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import sqlalchemy as sa

from opslib import audit, backup, checks, db, lint, migrate, params
from opslib import history as run_history
from opslib.config import Settings, load_settings
from opslib.display import Section
from opslib.outcome import Outcome, outcome_of
from opslib.record import BackupRef, Database, revisions_text
from opslib.errors import (
    Interrupted,
    InvalidInput,
    MigrationFailed,
    OpsError,
    PreconditionFailed,
    VerificationFailed,
)

OUTPUT_TAIL = 20  # lines of the migrations' own output shown in a step's section
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

    @classmethod
    @contextmanager
    def held(cls) -> Iterator[list[int]]:
        """SIGINT and SIGTERM wait while the block runs; the list holds those that arrived."""
        caught: list[int] = []
        if threading.current_thread() is not threading.main_thread():
            yield caught
            return

        def hold(signum, frame) -> None:
            caught.append(signum)

        saved = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield caught
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)


def step(name: str) -> Callable:
    """Decorate a Run method as a recorded step; a failure ends the run and is re-raised."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(self: "Run", *args, **kwargs):
            self._require_open(name)
            entry = self.record.step(name, audit.iso(audit.now()))
            self._save()
            started = time.perf_counter()
            _Signals.in_step += 1
            try:
                result = fn(self, *args, **kwargs)
            except BaseException as err:
                _Signals.in_step -= 1
                if self.ended:  # sealed already (a signal passed on after the summary): nothing to add
                    raise
                if getattr(err, "output", ""):  # what the migrations printed or logged before the failure
                    self._keep_output(name, err.output)
                entry.outcome = outcome_of(err)[0]
                entry.duration_s = round(time.perf_counter() - started, 3)
                self._end(err)
                raise
            _Signals.in_step -= 1
            if self.ended:  # the summary sealed the run, its own step included
                held, self.held_signal = self.held_signal, None
                if held is not None:
                    signal.raise_signal(held)  # the signal that waited for the seal now takes effect
                return result
            skipped = isinstance(result, Section) and result.status.startswith("skipped")
            entry.outcome = Outcome.SKIPPED if skipped else Outcome.SUCCEEDED
            entry.duration_s = round(time.perf_counter() - started, 3)
            self._save()
            return result

        return wrapper

    return decorate


class Run:
    """One execution of a runbook: its settings, validated parameters and record."""

    runbook = ""

    def __init__(self, settings: Settings, values: dict, record: dict, stem: str, under_runner: bool):
        self.settings = settings
        self.params = values
        self.record = record
        self.stem = stem
        self.under_runner = under_runner
        self.ended = False
        self.held_signal: int | None = None
        self.live: audit.LiveMark | None = None
        self.url = None
        self.database = None
        self.run_lock: db.RunLock | None = None

    # --- bookkeeping ------------------------------------------------------------------------------

    @property
    def record_path(self) -> Path:
        """The run's sidecar JSON."""
        return audit.sidecar_path(self.settings.records_dir, self.stem)

    def _save(self) -> None:
        audit.write_sidecar(self.settings.records_dir, self.stem, self.record)

    def _require_open(self, name: str) -> None:
        if self.ended:
            raise PreconditionFailed(
                f"this run has ended ({self.record.outcome}); start a new run to {name} (re-run the first cell)"
            )

    def _revisions_now(self) -> list[str] | None:
        table = tuple(self.record.version_table) if self.record.version_table else None
        try:
            with db.connect(db.target_url(self.settings)) as conn:
                return list(migrate.current_revisions(conn, table or migrate.version_table(self.settings)))
        except OpsError:
            return None

    def _finish(self, err: BaseException | None = None) -> None:
        outcome, code = outcome_of(err)
        self.record.end(outcome, code, None if err is None else _message_of(err), audit.iso(audit.now()))
        if self.record.database is not None:
            self.record.revisions_after = self._revisions_now()
            if outcome is not Outcome.INVALID:  # bad input concerns no database: none is written to
                self._record_run_in_database()
        self.ended = True
        self._release_lock()
        self._save()

    def _close(self) -> None:
        """Seal an ended run: its ledger entry vouches for the sidecar as it is now, so nothing may change after."""
        if not self.under_runner:  # `opslib run` appends the ledger line itself, with the notebook's name
            audit.append_ledger(self.settings.records_dir, self.stem, self.record)
        if self.live is not None:
            self.live.release(remove=not self.under_runner)

    def _end(self, err: BaseException | None = None) -> int | None:
        """End and seal the run with SIGINT and SIGTERM held off; return the first signal that waited."""
        with _Signals.held() as caught:
            self._finish(err)
            self._close()
        _Signals.restore()
        _Signals.run = None
        return caught[0] if caught else None

    def _identify(self) -> list[tuple[str, object]]:
        """Connect, record which database this is, and return its identity as facts to show."""
        self.url = db.target_url(self.settings)
        with db.connect(self.url) as conn:
            version, _ = db.server_version(conn)
            fingerprint = db.fingerprint(conn)
        host = self.url.host or self.url.query.get("host")
        self.database = self.url.database
        self.record.database = Database(host, self.url.port, self.url.database)
        # Recorded before the lock: whoever seals this run if it dies reads the revision from this table.
        table = migrate.version_table(self.settings)
        self.record.alembic_ini = str(Path(self.settings.alembic_ini).resolve())
        self.record.version_table = list(table)
        self._save()
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
            with db.connect(db.target_url(self.settings)) as conn:
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

    def _restore_over_target(self, path, terminate: bool):
        """Restore a backup over the target: the run lock's own session is let go for the swap, then taken again."""
        self._release_lock()
        try:
            return backup.restore(self.settings, path, confirm=self.database, terminate_connections=terminate)
        finally:
            self._take_lock()

    def _require_confirm(self, why: str) -> None:
        if self.params.get("confirm") != self.database:
            given = repr(self.params.get("confirm")) if self.params.get("confirm") else "nothing"
            raise PreconditionFailed(
                f"{self.runbook} {why} needs confirm={self.database!r} (the database's name); got {given}"
            )

    def _take_backup(self, label: str) -> Section:
        if not self.params.get("backup"):
            return Section("Backup", f"skipped (backup=False, environment {self.settings.env})")
        made = backup.backup(self.settings, label=label)
        report = backup.verify_backup(
            self.settings, made.path, restore_test=self.params.get("restore_test", False)
        )
        report.raise_for_failure()
        self.record.backup = BackupRef(str(made.path.resolve()), made.manifest["sha256"])
        self._save()
        m = made.manifest
        app = {k: v for k, v in m["row_counts"].items() if not k.startswith("opslib.")}
        return Section(
            "Backup",
            "taken and verified",
            [
                ("file", made.path.name),
                ("revision", revisions_text(m["revisions"])),
                # The application's tables; the opslib history (which grows with every run) is in the manifest too.
                ("tables / rows", f"{len(app)} / {sum(app.values())}"),
                ("sha256", m["sha256"][:16] + "…"),
                (
                    "verification",
                    "restore test passed" if self.params.get("restore_test") else "checksum and archive",
                ),
            ],
        )

    def _steps_recorder(self, verb: str) -> Callable:
        """Record each revision as a step of its own, as it commits.

        The sidecar is rewritten at most every SAVE_EVERY_S seconds here (and always when the step
        ends): rewriting it for each of 200 quick revisions would cost more than applying them.
        """
        saved = [time.monotonic()]

        def on_step(info: migrate.RevisionInfo, seconds: float) -> None:
            self.record.step(
                f"{verb} {info.revision}",
                audit.iso(audit.now() - timedelta(seconds=seconds)),
                duration_s=round(seconds, 3),
                outcome=Outcome.SUCCEEDED,
            )
            if time.monotonic() - saved[0] >= SAVE_EVERY_S:
                self._save()
                saved[0] = time.monotonic()

        return on_step

    def _migrated(self, title: str, status: str, result: migrate.MigrationResult) -> Section:
        """A migration step's section: where the database is now, each revision, and what the migrations
        printed or logged (the tail shown; all of it kept in the record)."""
        rows = [{"revision": s.revision, "message": s.message} for s in result.steps]
        text = ""
        if result.output.strip():
            self._keep_output(title.lower(), result.output)
            self._save()
            lines = result.output.rstrip().splitlines()
            shown = lines[-OUTPUT_TAIL:]
            head = f"# what the migrations printed or logged ({len(lines)} lines"
            head += f", the last {len(shown)} here; all in the record)" if len(shown) < len(lines) else ")"
            text = "\n".join([head, *shown])
        return Section(title, status, [("now at", revisions_text(result.after))], rows, text)

    def _keep_output(self, step_name: str, output: str) -> None:
        """Keep what the migrations printed or logged during a step, in full, in the record."""
        self.record.migration_output = {**(self.record.migration_output or {}), step_name: output}

    def _expect_revisions(self, expected: tuple[str, ...]) -> tuple[str, object]:
        read = self._revisions_now()
        if read is None:
            raise VerificationFailed(
                f"the database's revision could not be read (expected {revisions_text(expected)})"
            )
        now = tuple(sorted(read))
        if now != tuple(sorted(expected)):
            raise VerificationFailed(f"the database is at {revisions_text(now)}, expected {revisions_text(expected)}")
        return ("revision", revisions_text(now))

    @step("parameters")
    def validate(self, runbook: str, namespace: Mapping[str, Any], reload_settings: bool = False) -> None:
        """Validate the parameters and the environment's rules for this runbook (the run's first step)."""
        if reload_settings:
            load_settings()  # raises the configuration error, now recorded as this step's failure
        values = params.validate(runbook, params.from_namespace(runbook, namespace))
        self.params = values
        self.record.parameters = values
        env_name = values["database_url_env"]
        url = os.environ.get(env_name)
        if not url and env_name != "DATABASE_URL":
            raise InvalidInput(
                f"{runbook}: the environment variable {env_name} (database_url_env) is not set"
            )
        if url:
            db.parse_url(url, source=env_name)  # a malformed URL is refused here, before any connection
        self.settings = replace(self.settings, database_url=url or None)
        if runbook == "reset" and self.settings.env == "production":
            raise PreconditionFailed("reset is refused in production, whatever the parameters")
        if (
            self.settings.env == "production"
            and runbook != "reset"
            and "backup" in values
            and not values["backup"]
        ):
            raise PreconditionFailed(f"{runbook}: backup=False is not allowed in production")

    def _models_fact(self) -> tuple[str, object]:
        """Compare the database with the project's models; only meaningful at head, where the models are."""
        heads = {h.revision for h in migrate.heads(self.settings)}
        now = self._revisions_now()
        if now is None:
            return ("models", "skip: the database's revision could not be read")
        if set(now) != heads:
            return ("models", "skip: compared only when the database is at head")
        status, detail = migrate.compare_models(self.settings)
        if status == "fail":
            raise VerificationFailed(f"the database does not match the models: {detail}")
        return ("models", f"{status}: {detail}")

    @step("summary")
    def summary(self) -> Section:
        """End the run as succeeded, seal it, and show what it did."""
        r = self.record
        r.steps[-1].outcome = Outcome.SUCCEEDED  # this step seals the run: it is written as done
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
            facts.insert(4, ("schema public", f"recreated: {r.schema_recreated['reason']}"))
        rows = [
            {"step": s.name, "outcome": str(s.outcome), "seconds": s.duration_s}
            for s in r.steps
            if s.name != "summary"
        ]
        return Section(f"{self.runbook.capitalize()} summary", str(r.outcome), facts, rows)

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


# --- deploy -----------------------------------------------------------------------------------------


class Deploy(Run):
    """The guide's `make deploy-prod`: preflight, backup, upgrade, verify."""

    runbook = "deploy"
    pending: list = []
    plan: migrate.DeployPlan | None = None
    drift = None  # the preflight's comparison with the models, reused when nothing is applied

    @step("preflight")
    def preflight(self) -> Section:
        """Identify the target, run the pre-deploy checks (heads, lint, naming, backup…), list what will run and its SQL."""
        facts = self._identify()
        if self.settings.env == "production":
            self._require_confirm("in production")
        report = checks.pre_deploy(
            self.settings, self.params["target_revision"], backup_planned=self.params["backup"]
        )
        self.record.checks = report.to_dict()["checks"]
        # The findings that mattered (blocking, accepted with their reasons, advice); information is counted in the check.
        self.record.findings = [
            f.to_dict() for f in report.findings if f.severity is not lint.Severity.INFO
        ]
        self._save()
        check_rows = [{"check": c.name, "result": c.status, "detail": c.detail} for c in report.checks]
        if not report.ok:
            _show(Section("Preflight", "pre-deploy checks failed", facts, check_rows))
            report.raise_for_failure()
        self.plan = report.plan  # the checks planned the deploy and rendered its SQL already
        self.drift = next((c for c in report.checks if c.name == "drift"), None)
        self.pending = list(self.plan.pending)
        facts.append(("target revision", self.params["target_revision"]))
        if not self.pending:
            return Section(
                "Preflight", "nothing to do: the database is already at the target", facts, check_rows
            )
        sql = self.plan.sql.sql or "-- the SQL cannot be rendered offline (see the checks above)"
        rows = check_rows + [
            {"check": f"pending {r.revision}", "result": "", "detail": r.message} for r in self.pending
        ]
        return Section(
            "Preflight", f"checks passed, {len(self.pending)} revision(s) to apply", facts, rows, sql
        )

    @step("backup")
    def backup(self) -> Section:
        """Back up and verify before changing anything (skipped when nothing is pending)."""
        if not self.pending:
            return Section("Backup", "skipped: nothing to deploy")
        return self._take_backup(f"before deploy {self.record.run_id}")

    @step("upgrade")
    def upgrade(self) -> Section:
        """Apply the pending revisions under the lock, each committing on its own; on failure stop, or restore the backup."""
        if not self.pending:
            return Section("Upgrade", "skipped: nothing to deploy")
        try:
            result = migrate.upgrade(
                self.settings,
                self.pending[-1].revision,
                on_attempt=self._attempt_recorder(),
                on_step=self._steps_recorder("upgrade"),
            )
        except MigrationFailed as err:
            if self.params["on_failure"] != "restore":
                raise
            restored = backup.restore(
                self.settings,
                self.record.backup.path,
                confirm=self.database,
                terminate_connections=True,
            )
            raise MigrationFailed(
                f"{err.message} on_failure=restore: the pre-deploy backup was restored, the database is back at "
                f"{revisions_text(restored.revisions)} (the failed state is kept as {restored.replaced_database_kept_as})",
                changed=True,
                revisions=restored.revisions,
                output=err.output,
            ) from err
        return self._migrated("Upgrade", f"applied {len(result.steps)} revision(s)", result)

    @step("verify")
    def verify(self) -> Section:
        """The database is at the target, and matches the project's models where it has them."""
        facts = [
            self._expect_revisions(
                tuple(r.revision for r in self.pending[-1:]) or tuple(self.record.revisions_before)
            )
        ]
        drift = self.drift
        if not self.pending and drift is not None and drift.status != "skip":
            # Nothing was applied since the preflight compared the models: its result still holds.
            facts.append(("models", f"{drift.status}: {drift.detail} (compared at preflight)"))
        else:
            facts.append(self._models_fact())
        return Section("Verify", "passed", facts)


# --- rollback ---------------------------------------------------------------------------------------


class Rollback(Run):
    """The guide's `make rollback-prod` / `migrate-down`: reverse revisions, with a backup first."""

    runbook = "rollback"
    reversing: list = []

    @property
    def target(self) -> str:
        """The downgrade target: the revision given, else -steps."""
        return self.params["target_revision"] or f"-{self.params['steps']}"

    @step("preflight")
    def preflight(self) -> Section:
        """Identify the target, list the revisions to reverse and their SQL; refuse irreversible ones."""
        facts = self._identify()
        if self.settings.env == "production":
            self._require_confirm("in production")
        current, self.reversing = migrate.plan(self.settings, "downgrade", self.target)
        facts.append(("roll back to", self.target))
        if not self.reversing:
            return Section("Preflight", "nothing to do: the database is already at the target", facts)
        irreversible = [r.revision for r in self.reversing if not migrate.has_real_downgrade(r)]
        acknowledged = [r.strip() for r in self.params["acknowledge_irreversible"].split(",") if r.strip()]
        stray = [r for r in acknowledged if r not in irreversible]
        if stray:
            raise InvalidInput(
                f"rollback: acknowledge_irreversible names {', '.join(stray)}, which this rollback does not "
                f"reverse without a real downgrade (those are: {', '.join(irreversible) or 'none'})"
            )
        missing = [r for r in irreversible if r not in acknowledged]
        if missing:
            raise PreconditionFailed(
                f"revision {', '.join(missing)} has no real downgrade (it does nothing or raises): roll back "
                "with the recovery runbook, restoring a backup taken before it, or acknowledge that its changes "
                f"stay with acknowledge_irreversible={','.join(irreversible)!r}"
            )
        if acknowledged:
            # Kept in the record: the database's revision moves back, these revisions' changes stay.
            self.record.acknowledged_irreversible = acknowledged
            self._save()
            facts.append(("acknowledged irreversible", ", ".join(acknowledged) + " (their changes stay)"))
        last = self.reversing[-1]
        below = last.down_revisions[0] if len(last.down_revisions) == 1 else "base"
        sql = _offline(self.settings, f"{current[0]}:{below}") if len(current) == 1 else ""
        rows = [{"revision": r.revision, "message": r.message} for r in self.reversing]
        return Section("Preflight", f"{len(self.reversing)} revision(s) to reverse", facts, rows, sql)

    @step("backup")
    def backup(self) -> Section:
        """Back up and verify before reversing anything."""
        if not self.reversing:
            return Section("Backup", "skipped: nothing to roll back")
        return self._take_backup(f"before rollback {self.record.run_id}")

    @step("downgrade")
    def downgrade(self) -> Section:
        """Reverse the revisions under the lock, each committing on its own."""
        if not self.reversing:
            return Section("Downgrade", "skipped: nothing to roll back")
        result = migrate.downgrade(
            self.settings,
            self.target,
            on_step=self._steps_recorder("downgrade"),
            on_attempt=self._attempt_recorder(),
        )
        return self._migrated("Downgrade", f"reversed {len(result.steps)} revision(s)", result)

    @step("verify")
    def verify(self) -> Section:
        """The database is where the rollback was to leave it."""
        before = self.record.revisions_before
        if not self.reversing:
            return Section("Verify", "passed", [self._expect_revisions(tuple(before))])
        last = self.reversing[-1]
        return Section("Verify", "passed", [self._expect_revisions(tuple(last.down_revisions))])


# --- recovery ---------------------------------------------------------------------------------------


class Recovery(Run):
    """The guide's recovery procedures: restore a backup and replay migrations, or stamp after a manual fix."""

    runbook = "recovery"
    backup_file: Path | None = None
    manifest: dict = {}

    @step("preflight")
    def preflight(self) -> Section:
        """Identify the target and show what will be done: the backup to restore, or the revision to stamp."""
        facts = self._identify()
        if self.params["mode"] == "stamp":
            if self.settings.env == "production":
                self._require_confirm("stamp in production")
            info = migrate.show(self.settings, self.params["stamp_revision"])
            facts += [("stamp", f"{info.revision} ({info.message})"), ("reason", self.params["reason"])]
            return Section("Preflight", "stamp after a manual fix", facts)
        self._require_confirm("replaces the database and")
        self.backup_file = self._choose_backup()
        backup.verify_backup(self.settings, self.backup_file, record=False).raise_for_failure()
        self.manifest = backup.read_manifest(self.backup_file)
        m = self.manifest
        facts += [
            ("backup", self.backup_file.name),
            ("taken at", m["started_at"]),
            ("backup revision", revisions_text(m["revisions"])),
            ("then replay to", self.params["target_revision"] or "no replay"),
        ]
        return Section("Preflight", "restore a backup, then replay migrations", facts)

    def _choose_backup(self) -> Path:
        if self.params["backup_file"]:
            path = Path(self.params["backup_file"])
            if not path.is_absolute() and not path.exists():
                path = Path(self.settings.backups_dir) / path
            if not path.is_file():
                raise InvalidInput(f"recovery: no backup file {self.params['backup_file']!r}")
            return path
        for info in backup.list_backups(self.settings):
            if info.database == self.database and info.verified:
                return info.path
        raise PreconditionFailed(
            f"recovery: no verified backup of {self.database!r} in {self.settings.backups_dir}: "
            "name one with backup_file, or verify one with `opslib verify-backup FILE`"
        )

    @step("restore")
    def restore(self) -> Section:
        """Restore the backup over the database (the replaced one is kept under another name)."""
        if self.params["mode"] != "restore":
            return Section("Restore", "skipped: mode=stamp")
        done = self._restore_over_target(self.backup_file, terminate=self.params["terminate_connections"])
        self.record.backup = BackupRef(str(self.backup_file.resolve()), self.manifest["sha256"])
        self.record.database_history = (
            f"the database's opslib history now ends where the backup was taken ({self.manifest['started_at']}); "
            "this run's rows follow it"
        )
        self._save()
        facts = [
            ("restored revision", revisions_text(done.revisions)),
            ("matches the manifest", "yes" if done.matches_manifest else "NO"),
            ("replaced database kept as", done.replaced_database_kept_as),
            ("history in the database", f"as of the backup ({self.manifest['started_at']}), then this run"),
        ]
        return Section("Restore", "restored", facts)

    @step("replay")
    def replay(self) -> Section:
        """Replay migrations from the restored revision up to target_revision."""
        if self.params["mode"] != "restore" or not self.params["target_revision"]:
            return Section(
                "Replay",
                "skipped: " + ("mode=stamp" if self.params["mode"] != "restore" else "no target_revision"),
            )
        _, pending = migrate.plan(self.settings, "upgrade", self.params["target_revision"])
        if not pending:
            return Section("Replay", "nothing to do: the restored database is at the target")
        result = migrate.upgrade(
            self.settings,
            pending[-1].revision,
            on_step=self._steps_recorder("upgrade"),
            on_attempt=self._attempt_recorder(),
        )
        return self._migrated("Replay", f"applied {len(result.steps)} revision(s)", result)

    @step("stamp")
    def stamp(self) -> Section:
        """Record stamp_revision as the database's revision (mode=stamp), with the reason in the record."""
        if self.params["mode"] != "stamp":
            return Section("Stamp", "skipped: mode=restore")
        result = migrate.stamp(self.settings, self.params["stamp_revision"])
        facts = [
            ("before", revisions_text(result.before)),
            ("after", revisions_text(result.after)),
            ("reason", self.params["reason"]),
        ]
        return Section("Stamp", "stamped", facts)

    @step("verify")
    def verify(self) -> Section:
        """The database is at the revision the recovery was to leave it at."""
        if self.params["mode"] == "stamp":
            expected = tuple(r.revision for r in [migrate.show(self.settings, self.params["stamp_revision"])])
        elif self.params["target_revision"]:
            _, pending = migrate.plan(self.settings, "upgrade", self.params["target_revision"])
            if pending:
                raise VerificationFailed(f"{len(pending)} revision(s) still pending after the replay")
            return Section("Verify", "passed", [("revision", revisions_text(self._revisions_now()))])
        else:
            expected = tuple(self.manifest["revisions"])
        return Section("Verify", "passed", [self._expect_revisions(expected)])


# --- reset --------------------------------------------------------------------------------------------


class Reset(Run):
    """The guide's `make db-reset`: everything down, everything up, sample data again."""

    runbook = "reset"
    downgrade_failure: MigrationFailed | None = None

    @step("preflight")
    def preflight(self) -> Section:
        """Identify the target; in staging the name must be confirmed (production was refused at start)."""
        facts = self._identify()
        if self.settings.env == "staging":
            self._require_confirm("in staging")
        facts.append(("reseed", "yes (-x dev_data=true)" if self.params["reseed"] else "no"))
        return Section("Preflight", "reset: downgrade to base, upgrade to head", facts)

    @step("backup")
    def backup(self) -> Section:
        """Optionally back up first (backup=True)."""
        return self._take_backup(f"before reset {self.record.run_id}")

    @step("teardown")
    def teardown(self) -> Section:
        """Downgrade to base (unless recreate_schema=always). A failed downgrade is recorded as a failed step of
        its own; with recreate_schema=never it ends the run, else the schema is recreated in the next step."""
        if self.params["recreate_schema"] == "always":
            return Section("Teardown", "skipped: recreate_schema=always (the next step recreates the schema)")
        if not self.record.revisions_before:
            return Section("Teardown", "nothing to do: the database is at base")
        try:
            result = migrate.downgrade(
                self.settings,
                "base",
                on_step=self._steps_recorder("downgrade"),
                on_attempt=self._attempt_recorder(),
            )
        except MigrationFailed as err:
            if self.params["recreate_schema"] == "never":
                raise
            self.downgrade_failure = err
            self.record.step(
                "downgrade base",
                audit.iso(audit.now()),
                outcome=Outcome.FAILED,
                error=err.message,
                revisions=None if err.revisions is None else list(err.revisions),
            )
            self._save()
            return Section(
                "Teardown",
                "downgrade failed: schema public is recreated in the next step (recreate_schema=on_failure)",
                [("downgrade error", err.message), ("database at", revisions_text(err.revisions))],
            )
        return self._migrated("Teardown", f"downgraded {len(result.steps)} revision(s) to base", result)

    @step("recreate schema")
    def recreate_schema(self) -> Section:
        """Drop and recreate schema public, keeping its owner, grants and comment; say what was dropped and why."""
        mode = self.params["recreate_schema"]
        if mode == "never" or (mode == "on_failure" and self.downgrade_failure is None):
            return Section(
                "Recreate schema",
                "skipped: " + ("recreate_schema=never" if mode == "never" else "every downgrade ran"),
            )
        why = (
            "recreate_schema=always"
            if mode == "always"
            else f"a downgrade failed: {self.downgrade_failure.message}"
        )
        url = db.target_url(self.settings)
        with db.connect(url) as conn:
            before = migrate.current_revisions(conn, migrate.version_table(self.settings))
            done = db.recreate_schema(conn, "public")
            run_history.record_event(
                conn, self.record.run_id, "(schema public)", before, (), "recreate schema",
                f"dropped {len(done.dropped)} object(s): {why}",
            )  # fmt: skip
            conn.commit()
        self.record.schema_recreated = {"schema": "public", "reason": why, "dropped": list(done.dropped)}
        self._save()
        facts = [
            ("why", why),
            ("dropped", f"{len(done.dropped)} object(s)"),
            (
                "kept",
                f"owner {done.owner}; grants {', '.join(done.grants) or 'none'}; comment {done.comment!r}",
            ),
        ]
        return Section(
            "Recreate schema", "recreated schema public", facts, [{"dropped": d} for d in done.dropped]
        )

    @step("rebuild")
    def rebuild(self) -> Section:
        """Upgrade to head, loading the sample data when reseed is on."""
        x_args = ["dev_data=true"] if self.params["reseed"] else []
        result = migrate.upgrade(
            self.settings,
            "head",
            x_args=x_args,
            on_step=self._steps_recorder("upgrade"),
            on_attempt=self._attempt_recorder(),
        )
        return self._migrated("Rebuild", f"applied {len(result.steps)} revision(s)", result)

    @step("verify")
    def verify(self) -> Section:
        """The database is at head and matches the models."""
        facts = [self._expect_revisions(tuple(h.revision for h in migrate.heads(self.settings)))]
        facts.append(self._models_fact())
        return Section("Verify", "passed", facts)


def _show(section: Section) -> None:
    """Display a section now (before a step raises), in a notebook or a terminal."""
    try:
        from IPython.display import display
    except ImportError:  # IPython comes with ipykernel; a bare interpreter just prints
        print(repr(section))
    else:
        display(section)


def _offline(settings: Settings, revision_range: str) -> str:
    try:
        return migrate.offline_sql(settings, revision_range)
    except OpsError as err:
        return f"-- the SQL cannot be rendered offline: {err.message}"


WORKFLOWS: dict[str, type[Run]] = {
    "deploy": Deploy,
    "rollback": Rollback,
    "recovery": Recovery,
    "reset": Reset,
}


# --- start ----------------------------------------------------------------------------------------------


def start(runbook: str, namespace: Mapping[str, Any]) -> Run:
    """Begin a run: validate the parameters found in the notebook's namespace, before any connection.

    Invalid parameters end the run at once (refused, exit 2) with its record written; so does a
    runbook the environment forbids (reset in production, a deploy without backup in production).
    """
    # What the imports made lives as long as the run's process or kernel: moved out of the garbage
    # collector's way, it spares each run several full collections (0.1-0.3 s each).
    gc.freeze()
    started = audit.now()
    run_id = os.environ.get(audit.RUN_ID_ENV) or audit.new_run_id()
    stem = os.environ.get(audit.RUN_STEM_ENV) or audit.record_stem(runbook, run_id, started)
    under_runner = audit.RUN_STEM_ENV in os.environ
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
    record = audit.new_record(runbook, run_id, started, operator=settings.operator, env=settings.env)
    workflow = WORKFLOWS.get(runbook, Run)
    run = workflow(settings, {}, record, stem, under_runner)
    # Held for the run's life, before its first sidecar: a record whose mark nobody holds was abandoned.
    run.live = audit.hold_live_mark(settings.records_dir, stem)
    _Signals.run = run
    run.validate(runbook, namespace, reload_settings=bad)
    return run
