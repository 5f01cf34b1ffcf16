"""The runbooks' workflows: every code cell of ``runbooks/*.ipynb`` is one call into this module.

A runbook's first code cell is ``run = runbook.start("deploy", globals())``: it validates the
parameters (before any connection) and returns the run, whose methods are the runbook's steps:
:class:`Deploy`, :class:`Rollback`, :class:`Recovery`, :class:`Reset`, :class:`InitProd` and :class:`Rehearse`. How steps are recorded,
ordered and sealed is :mod:`opslib.steps`. Nothing here prints a password: the URL comes from the
environment variable the parameters name.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Mapping

from opslib import audit, backup, checks, db, lint, migrate, rehearse, seed
from opslib import history as run_history
from opslib.config import Settings
from opslib.display import Section, findings_tables, first_line, show_now, shown_detail
from opslib.errors import (
    ChecksFailed,
    InvalidInput,
    MigrationFailed,
    OpsError,
    PreconditionFailed,
    VerificationFailed,
)
from opslib.outcome import Outcome
from opslib.record import BackupRef, revisions_text
from opslib.steps import Run, begin, step

OUTPUT_TAIL = 20  # lines of the migrations' own output shown in a step's section


class Workflow(Run):
    """What the four runbooks' steps share: confirming the target, backups, restores over the target,
    showing a migration's result, and checking where the database stands."""

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
            return Section.skip("Backup", f"backup=False (environment {self.settings.env})")
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


    def _migrated(self, title: str, status: str, result: migrate.MigrationResult) -> Section:
        """A migration step's section: where the database is now, each revision, and what the migrations
        printed or logged (the tail shown; all of it kept in the record)."""
        rows = [{"revision": s.revision, "message": first_line(s.message)} for s in result.steps]
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


# --- deploy -----------------------------------------------------------------------------------------


class Deploy(Workflow):
    """The guide's `make deploy-prod`: preflight, backup, upgrade, verify."""

    runbook = "deploy"
    pending: list = []
    plan: migrate.DeployPlan | None = None
    drift = None  # the preflight's comparison with the models, reused when nothing is applied

    @step("preflight", after="parameters")
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
        check_rows = [{"check": c.name, "result": c.status, "detail": shown_detail(c.detail)} for c in report.checks]
        found = findings_tables(report.findings)
        self.plan = report.plan  # the checks planned the deploy and rendered its SQL already (None: they stopped first)
        self.pending = list(self.plan.pending) if self.plan is not None else []
        pending_rows = [
            {"check": f"pending {r.revision}", "result": "", "detail": first_line(r.message)} for r in self.pending
        ]
        # The plan is shown refused or not: what would run, its SQL and each finding are what an operator needs
        # to decide, most of all when a finding blocks.
        sql = (self.plan.sql.sql or "-- the SQL cannot be rendered offline (see the checks above)") if self.pending else ""
        if not report.ok:
            failed = report.first_failure()
            status = f"refused: {failed.name} failed" + (f", {len(self.pending)} revision(s) not applied" if self.pending else "")
            show_now(Section("Preflight", status, facts, check_rows + pending_rows, sql, tables=found))
            report.raise_for_failure()
        self.drift = next((c for c in report.checks if c.name == "drift"), None)
        facts.append(("target revision", self.params["target_revision"]))
        if self.params["dev_data"]:
            facts.append(("dev_data", "yes (-x dev_data=true): the revisions load the development sample data"))
        if not self.pending:
            return Section(
                "Preflight", "nothing to do: the database is already at the target", facts, check_rows, tables=found
            )
        return Section(
            "Preflight", f"checks passed, {len(self.pending)} revision(s) to apply", facts, check_rows + pending_rows,
            sql, tables=found,
        )

    @step("backup", after="preflight")
    def backup(self) -> Section:
        """Back up and verify before changing anything (skipped when nothing is pending)."""
        if not self.pending:
            return Section.skip("Backup", "nothing to deploy")
        return self._take_backup(f"before deploy {self.record.run_id}")

    @step("upgrade", after="backup")
    def upgrade(self) -> Section:
        """Apply the pending revisions under the lock, each committing on its own; on failure stop, or restore the backup."""
        if not self.pending:
            return Section.skip("Upgrade", "nothing to deploy")
        try:
            result = migrate.upgrade(
                self.settings,
                self.pending[-1].revision,
                x_args=["dev_data=true"] if self.params["dev_data"] else [],
                on_attempt=self._attempt_recorder(),
                on_step=self._steps_recorder("upgrade"),
            )
        except MigrationFailed as err:
            if self.params["on_failure"] != "restore":
                raise
            restored = self._restore_over_target(self.record.backup.path, terminate=True)
            raise MigrationFailed(
                f"{err.message} on_failure=restore: the pre-deploy backup was restored, the database is back at "
                f"{revisions_text(restored.revisions)} (the failed state is kept as {restored.replaced_database_kept_as})",
                changed=True,
                revisions=restored.revisions,
                output=err.output,
            ) from err
        return self._migrated("Upgrade", f"applied {len(result.steps)} revision(s)", result)

    @step("verify", after="upgrade", repeatable=True)
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


class Rollback(Workflow):
    """The guide's `make rollback-prod` / `migrate-down`: reverse revisions, with a backup first."""

    runbook = "rollback"
    reversing: list = []

    @property
    def target(self) -> str:
        """The downgrade target: the revision given, else -steps."""
        return self.params["target_revision"] or f"-{self.params['steps']}"

    @step("preflight", after="parameters")
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
        rows = [{"revision": r.revision, "message": first_line(r.message)} for r in self.reversing]
        return Section("Preflight", f"{len(self.reversing)} revision(s) to reverse", facts, rows, sql)

    @step("backup", after="preflight")
    def backup(self) -> Section:
        """Back up and verify before reversing anything."""
        if not self.reversing:
            return Section.skip("Backup", "nothing to roll back")
        return self._take_backup(f"before rollback {self.record.run_id}")

    @step("downgrade", after="backup")
    def downgrade(self) -> Section:
        """Reverse the revisions under the lock, each committing on its own."""
        if not self.reversing:
            return Section.skip("Downgrade", "nothing to roll back")
        result = migrate.downgrade(
            self.settings,
            self.target,
            on_step=self._steps_recorder("downgrade"),
            on_attempt=self._attempt_recorder(),
        )
        return self._migrated("Downgrade", f"reversed {len(result.steps)} revision(s)", result)

    @step("verify", after="downgrade", repeatable=True)
    def verify(self) -> Section:
        """The database is where the rollback was to leave it."""
        before = self.record.revisions_before
        if not self.reversing:
            return Section("Verify", "passed", [self._expect_revisions(tuple(before))])
        last = self.reversing[-1]
        return Section("Verify", "passed", [self._expect_revisions(tuple(last.down_revisions))])


# --- recovery ---------------------------------------------------------------------------------------


class Recovery(Workflow):
    """The guide's recovery procedures: restore a backup and replay migrations, or stamp after a manual fix."""

    runbook = "recovery"
    backup_file: Path | None = None
    manifest: dict = {}

    @step("preflight", after="parameters")
    def preflight(self) -> Section:
        """Identify the target and show what will be done: the backup to restore, or the revision to stamp."""
        facts = self._identify()
        if self.params["mode"] == "stamp":
            if self.settings.env == "production":
                self._require_confirm("stamp in production")
            info = migrate.show(self.settings, self.params["stamp_revision"])
            facts += [("stamp", f"{info.revision} ({first_line(info.message)})"), ("reason", self.params["reason"])]
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

    @step("restore", after="preflight")
    def restore(self) -> Section:
        """Restore the backup over the database (the replaced one is kept under another name)."""
        if self.params["mode"] != "restore":
            return Section.skip("Restore", "mode=stamp")
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

    @step("replay", after="restore")
    def replay(self) -> Section:
        """Replay migrations from the restored revision up to target_revision."""
        if self.params["mode"] != "restore" or not self.params["target_revision"]:
            return Section.skip(
                "Replay",
                "mode=stamp" if self.params["mode"] != "restore" else "no target_revision",
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

    @step("stamp", after="replay")
    def stamp(self) -> Section:
        """Record stamp_revision as the database's revision (mode=stamp), with the reason in the record."""
        if self.params["mode"] != "stamp":
            return Section.skip("Stamp", "mode=restore")
        result = migrate.stamp(self.settings, self.params["stamp_revision"])
        facts = [
            ("before", revisions_text(result.before)),
            ("after", revisions_text(result.after)),
            ("reason", self.params["reason"]),
        ]
        return Section("Stamp", "stamped", facts)

    @step("verify", after="stamp", repeatable=True)
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


class Reset(Workflow):
    """The guide's `make db-reset`: everything down, everything up, sample data again."""

    runbook = "reset"
    downgrade_failure: MigrationFailed | None = None

    @step("preflight", after="parameters")
    def preflight(self) -> Section:
        """Identify the target; in staging the name must be confirmed (production was refused at start)."""
        facts = self._identify()
        if self.settings.env == "staging":
            self._require_confirm("in staging")
        facts.append(("dev_data", "yes (-x dev_data=true)" if self.params["dev_data"] else "no"))
        return Section("Preflight", "reset: downgrade to base, upgrade to head", facts)

    @step("backup", after="preflight")
    def backup(self) -> Section:
        """Optionally back up first (backup=True)."""
        return self._take_backup(f"before reset {self.record.run_id}")

    @step("teardown", after="backup")
    def teardown(self) -> Section:
        """Downgrade to base (unless recreate_schema=always). A failed downgrade is recorded as a failed step of
        its own; with recreate_schema=never it ends the run, else the schema is recreated in the next step."""
        if self.params["recreate_schema"] == "always":
            return Section.skip("Teardown", "recreate_schema=always (the next step recreates the schema)")
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

    @step("recreate schema", after="teardown")
    def recreate_schema(self) -> Section:
        """Drop and recreate schema public, keeping its owner, grants and comment; say what was dropped and why."""
        mode = self.params["recreate_schema"]
        if mode == "never" or (mode == "on_failure" and self.downgrade_failure is None):
            return Section.skip(
                "Recreate schema",
                "recreate_schema=never" if mode == "never" else "every downgrade ran",
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

    @step("rebuild", after="recreate schema")
    def rebuild(self) -> Section:
        """Upgrade to head, loading the sample data when dev_data is on."""
        x_args = ["dev_data=true"] if self.params["dev_data"] else []
        result = migrate.upgrade(
            self.settings,
            "head",
            x_args=x_args,
            on_step=self._steps_recorder("upgrade"),
            on_attempt=self._attempt_recorder(),
        )
        return self._migrated("Rebuild", f"applied {len(result.steps)} revision(s)", result)

    @step("verify", after="rebuild", repeatable=True)
    def verify(self) -> Section:
        """The database is at head and matches the models."""
        facts = [self._expect_revisions(tuple(h.revision for h in migrate.heads(self.settings)))]
        facts.append(self._models_fact())
        return Section("Verify", "passed", facts)


# --- init-prod --------------------------------------------------------------------------------------


class InitProd(Workflow):
    """The guide's `make init-prod`: the schema at head, then the production essentials (admin user,
    settings, CMS pages, email templates), each inserted only when absent."""

    runbook = "init-prod"
    essentials: seed.Essentials | None = None
    at_base = False

    def _check_inputs(self) -> None:
        # Before any connection: a missing admin variable ends the run here (exit 2). The values stay in
        # this process's environment; neither reaches the record, the notebook or a message.
        seed.admin_credentials(self.params["admin_email_env"], self.params["admin_password_env"])

    @step("preflight", after="parameters")
    def preflight(self) -> Section:
        """Identify the target; it must be empty (at base) or at head: pending revisions are the deploy's."""
        facts = self._identify()
        self.essentials = seed.load_essentials(self.settings)
        heads = tuple(sorted(h.revision for h in migrate.heads(self.settings)))
        now = tuple(sorted(self.record.revisions_before or ()))
        if now and now != heads:
            raise PreconditionFailed(
                f"init-prod sets up a new database (at base) or completes one at head; this one is at "
                f"{revisions_text(now)} with revisions pending: deploy them first with the deploy runbook "
                "(make deploy-prod), which takes a backup"
            )
        self.at_base = not now
        facts.append(("essentials", self.essentials.path.name))
        status = "new database: upgrade to head, then the essentials" if self.at_base else "at head: the essentials"
        return Section("Preflight", status, facts)

    @step("schema", after="preflight")
    def schema(self) -> Section:
        """Upgrade an empty database to head (skipped when it is at head already)."""
        if not self.at_base:
            return Section.skip("Schema", "already at head")
        result = migrate.upgrade(
            self.settings, "head", on_step=self._steps_recorder("upgrade"), on_attempt=self._attempt_recorder()
        )
        return self._migrated("Schema", f"applied {len(result.steps)} revision(s)", result)

    @step("essentials", after="schema")
    def insert_essentials(self) -> Section:
        """Insert the missing essentials in one transaction; present rows are left as they are."""
        email, password = seed.admin_credentials(self.params["admin_email_env"], self.params["admin_password_env"])
        with db.connect(db.target_url(self.settings)) as conn:
            outcomes = seed.apply_essentials(conn, self.essentials, email, password)
            conn.commit()
        self.record.data_changes = [o.to_dict() for o in outcomes]
        self._save()
        created = sum(o.created for o in outcomes)
        rows = [{"item": o.item, "table": o.table, "created": o.created, "already there": o.present} for o in outcomes]
        status = f"created {created} row(s)" if created else "nothing to do: every essential is there already"
        return Section("Essentials", status, [], rows)

    @step("verify", after="essentials", repeatable=True)
    def verify(self) -> Section:
        """The database is at head, every essential row is there, and the admin's password is only a hash."""
        email, _ = seed.admin_credentials(self.params["admin_email_env"], self.params["admin_password_env"])
        facts = [self._expect_revisions(tuple(h.revision for h in migrate.heads(self.settings)))]
        with db.connect(db.target_url(self.settings)) as conn:
            try:
                facts += seed.check_essentials(conn, self.essentials, email)
            except PreconditionFailed as err:
                raise VerificationFailed(err.message) from None
        return Section("Verify", "passed", facts)


# --- rehearse -------------------------------------------------------------------------------------


class Rehearse(Workflow):
    """The guide's "test migrations on a copy of production data": upgrade, downgrade and upgrade again a
    scratch copy of the target, timed and compared; the target is only read, and the copy is dropped."""

    runbook = "rehearse"
    copy: rehearse.Copy | None = None
    on_copy: Settings | None = None
    start: tuple[str, ...] = ()
    pending: list = []
    taken_back: migrate.MigrationResult | None = None  # from_revision: the copy's preparatory downgrade

    def _findings(self) -> dict:
        if self.record.rehearsal is None:
            self.record.rehearsal = {"copy": None, "revisions": [], "differences": {}, "copy_dropped": None}
        return self.record.rehearsal

    @step("preflight", after="parameters")
    def preflight(self) -> Section:
        """Identify the target (without its run lock: it is only read) and list the revisions to rehearse."""
        facts = self._identify(lock=False)
        facts.append(("target revision", self.params["target_revision"]))
        back_to = self.params["from_revision"]
        if back_to and back_to != "base" and (back_to,) == tuple(self.record.revisions_before or ()):
            back_to = ""  # the target is there already: the usual rehearsal, from where it stands
        if back_to:
            if back_to != "base":
                migrate.show(self.settings, back_to)  # an unknown one is refused here
            facts.append(("from revision", f"{self.params['from_revision']} (the copy is downgraded to it first)"))
            self.pending = [None]  # known once the copy is there
            return Section("Preflight", "the copy is taken back to from_revision, then rehearsed", facts)
        current, steps = migrate.plan(self.settings, "upgrade", self.params["target_revision"])
        self._plan(tuple(current), steps)
        if not self.pending:
            return Section("Preflight", "nothing to rehearse: the database is at the target already", facts)
        rows = [{"revision": r.revision, "message": first_line(r.message)} for r in self.pending]
        return Section("Preflight", f"{len(self.pending)} revision(s) to rehearse on a copy", facts, rows)

    def _plan(self, current: tuple[str, ...], steps: list) -> None:
        if len(current) > 1:
            raise PreconditionFailed(
                f"the database is at several heads ({revisions_text(current)}): rehearse from one revision"
            )
        self.start, self.pending = current, list(steps)

    @step("copy", after="preflight")
    def make_copy(self) -> Section:
        """Copy the target into a scratch database: a template clone when idle, else its newest verified backup."""
        if not self.pending:
            return Section.skip("Copy", "nothing to rehearse")
        name = rehearse.scratch_name(self.database, self.record.run_id)
        dropped = self._drop_stale_copies()
        self._findings()["copy"] = {"database": name, "method": None, "seconds": None}
        if dropped:
            self._findings()["stale_copies_dropped"] = dropped
        self._save()  # named before it exists: whoever ends this run drops it
        self.copy = rehearse.make_copy(self.settings, name)
        self.on_copy = rehearse.settings_on(self.settings, name)
        self._findings()["copy"] = self.copy.to_dict()
        facts = [("copy", name), ("seconds", self.copy.seconds)]
        if dropped:
            facts.append(("dropped first", ", ".join(dropped) + " (left by rehearsals that were killed)"))
        if self.pending == [None]:  # from_revision: taken back first, the revisions known from there
            taken = self._on_copy(
                f"taking the copy back to {self.params['from_revision']}", migrate.downgrade, self.params["from_revision"]
            )
            self.taken_back = taken
            self._plan(*migrate.plan(self.on_copy, "upgrade", self.params["target_revision"]))
            facts.append(("taken back to", f"{revisions_text(taken.after)} ({len(taken.steps)} revision(s))"))
            if not self.pending:
                raise PreconditionFailed(
                    f"nothing to rehearse from {self.params['from_revision']} to {self.params['target_revision']}"
                )
        self.before = self._snapshot()
        self._save()
        rows = [{"revision": r.revision, "message": first_line(r.message)} for r in self.pending]
        return Section("Copy", f"copied by {self.copy.method}", facts, rows)

    def _drop_stale_copies(self) -> list[str]:
        """Drop the copies left by earlier rehearsals of this database that ended without dropping theirs
        (a kill -9): only those whose run the records show ended; a copy of a run still going is kept."""
        dropped = []
        for run_id, name in rehearse.copies_of(self.settings, self.database).items():
            try:
                ended = audit.find_run(self.settings.records_dir, run_id).get("outcome") != str(Outcome.RUNNING)
            except OpsError:
                continue  # not a run of these records: not ours to judge
            if ended and rehearse.drop_copy(self.settings, name):
                dropped.append(name)
        return dropped

    def _snapshot(self) -> rehearse.Snapshot:
        with db.connect(db.target_url(self.on_copy)) as conn:
            return rehearse.snapshot(conn, migrate.version_table(self.on_copy))

    def _on_copy(self, what: str, verb, *args, **kwargs):
        """A migration of the copy; its failure is the rehearsal's finding, said as one (the target is untouched)."""
        try:
            return verb(self.on_copy, *args, **kwargs)
        except MigrationFailed as err:
            raise ChecksFailed(
                f"{what} failed on the copy: {err.message.split('. ')[0]}; the target is untouched: fix the "
                "revision and rehearse again"
            ) from err

    def _pass(self, title: str, passage: str, action: str, target: str) -> Section:
        recorder = rehearse.PassRecorder(passage)
        verb = migrate.upgrade if action == "upgrade" else migrate.downgrade
        self._on_copy(f"the {passage}", verb, target, on_step=recorder.on_step, on_locks=recorder.on_locks)
        self._findings()["revisions"] += [r.to_dict() for r in recorder.revisions]
        self._save()
        rows = [
            {
                "revision": r.revision,
                "seconds": f"{r.seconds:.3f}",
                "locks": "; ".join(str(lock) for lock in r.locks) or "none in its transaction",
                "blocks reads of": ", ".join(r.flagged),
            }
            for r in recorder.revisions
        ]
        flagged = sum(1 for r in recorder.revisions if r.flagged)
        status = f"{len(recorder.revisions)} revision(s) in {sum(r.seconds for r in recorder.revisions):.3f} s"
        if flagged:
            status += f"; {flagged} took ACCESS EXCLUSIVE on a table with rows"
        return Section(title, status, [], rows)

    @step("upgrade", after="copy")
    def upgrade(self) -> Section:
        """Upgrade the copy to the target revision, timing each revision and reading its table locks."""
        if not self.pending:
            return Section.skip("Upgrade", "nothing to rehearse")
        try:
            section = self._pass("Upgrade", "upgrade", "upgrade", self.pending[-1].revision)
        except ChecksFailed as err:
            blamed = self._left_by_preparation(err)
            if blamed is None:
                raise
            raise blamed from err
        self.upgraded = self._snapshot()
        return section

    def _left_by_preparation(self, err: ChecksFailed) -> ChecksFailed | None:
        """With from_revision, the first upgrade failing on an object the copy already had after its
        preparatory downgrade: that downgrade left it behind, and the finding says so (as a second
        upgrade's failure names what the rehearsal's downgrade left), naming the revision whose downgrade
        did not remove it. None for any other failure: the revision that failed is the finding."""
        cause = err.__cause__
        if self.taken_back is None or not isinstance(cause, MigrationFailed):
            return None
        left = rehearse.already_there(cause.message, self.before)
        if not left:
            return None  # not there before this pass: the failing revision made it twice itself
        failing = self._stopped_at(cause.revisions)
        undone = {r.revision for r in self.taken_back.steps}
        whose = (
            f" (the downgrade of {failing.revision}, whose upgrade creates it, did not remove it)"
            if failing is not None and failing.revision in undone
            else ""
        )
        found = rehearse.Differences(left_behind=left)
        self._findings()["differences"] = {"preparatory_downgrade": found.to_dict()}
        self._save()
        return ChecksFailed(
            f"the preparatory downgrade to {self.params['from_revision']} left {', '.join(left)} behind{whose}, "
            f"so the upgrade failed on the copy: {cause.message.split('. ')[0]}; the target is untouched: fix "
            "that downgrade and rehearse again"
        )

    def _stopped_at(self, revisions: tuple[str, ...] | None) -> migrate.RevisionInfo | None:
        """The pending revision a failed upgrade of the copy stopped at: the one after where it stands
        (each revision commits on its own), or None when that cannot be told."""
        ids = [r.revision for r in self.pending]
        at = tuple(revisions or ())
        if set(at) == set(self.start):
            return self.pending[0]
        if len(at) == 1 and at[0] in ids[:-1]:
            return self.pending[ids.index(at[0]) + 1]
        return None

    @step("downgrade", after="upgrade")
    def downgrade(self) -> Section:
        """Downgrade the copy back to where the target is."""
        if not self.pending:
            return Section.skip("Downgrade", "nothing to rehearse")
        section = self._pass("Downgrade", "downgrade", "downgrade", self.start[0] if self.start else "base")
        # Compared at once: the second upgrade may fail on what the downgrade left, and this is why.
        self.downgrade_diff = rehearse.compare(self.before, self._snapshot())
        self._findings()["differences"] = {"downgrade_vs_before": self.downgrade_diff.to_dict()}
        self._save()
        if not self.downgrade_diff.none:
            section.status += f"; {len(self.downgrade_diff.lines())} difference(s) from the copy as it was"
            section.rows += [{"revision": "", "seconds": "", "locks": d, "blocks reads of": ""}
                             for d in self.downgrade_diff.lines()]
        return section

    @step("upgrade again", after="downgrade")
    def upgrade_again(self) -> Section:
        """Upgrade the copy to the target once more: a chain that cannot be run again shows here."""
        if not self.pending:
            return Section.skip("Upgrade again", "nothing to rehearse")
        try:
            return self._pass("Upgrade again", "upgrade again", "upgrade", self.pending[-1].revision)
        except ChecksFailed as err:
            left = "; ".join(self.downgrade_diff.lines()[:4]) or "nothing the comparison sees"
            failed = err.__cause__.message.split(". ")[0] if isinstance(err.__cause__, OpsError) else err.message
            raise ChecksFailed(
                f"the upgrade cannot run again after its downgrade, on the copy: {failed}; after the downgrade: {left}"
            ) from err

    @step("verify", after="upgrade again", repeatable=True)
    def compare(self) -> Section:
        """Compare the passes: the downgrade against the copy as it was, the second upgrade against the first."""
        if not self.pending:
            return Section.skip("Compare", "nothing to rehearse")
        downgrade_diff = self.downgrade_diff
        upgrade_diff = rehearse.compare(self.upgraded, self._snapshot())
        self._findings()["differences"]["upgrade_again_vs_upgrade"] = upgrade_diff.to_dict()
        self._save()
        rows = [{"comparison": "after the downgrade, against the copy as it was", "difference": d}
                for d in downgrade_diff.lines()]
        rows += [{"comparison": "after the second upgrade, against the first", "difference": d}
                 for d in upgrade_diff.lines()]
        if rows:
            show_now(Section("Compare", f"{len(rows)} difference(s) between the passes", [], rows))
            raise ChecksFailed(
                f"the rehearsal found {len(rows)} difference(s) between the passes: "
                + "; ".join(r["difference"] for r in rows[:4])
                + (f"; and {len(rows) - 4} more (in the record)" if len(rows) > 4 else "")
            )
        facts = [
            ("schema and data after the downgrade", "as before the upgrade"),
            ("schema and data after the second upgrade", "as after the first"),
        ]
        return Section("Compare", "no difference between the passes", facts)

    @step("drop copy", after="verify")
    def drop_copy(self) -> Section:
        """Drop the scratch copy (also done when the run ends any other way)."""
        if not (self._findings().get("copy") or {}).get("database"):
            return Section.skip("Drop copy", "no copy was made")
        dropped = self._drop_copy()
        return Section("Drop copy", "dropped" if dropped else "no copy to drop",
                       [("copy", (self._findings().get("copy") or {}).get("database", "none"))])

    def _drop_copy(self) -> bool:
        kept = (self.record.rehearsal or {}).get("copy") or {}
        if not kept.get("database"):
            return False
        dropped = rehearse.drop_copy(self.settings, kept["database"])
        self._findings()["copy_dropped"] = True
        self._save()
        return dropped

    def _finish(self, err: BaseException | None = None) -> None:
        # The copy never outlives the run: dropped here whatever ended it (a failed pass, a refusal).
        try:
            self._drop_copy()
        except Exception as drop_err:  # noqa: BLE001 -- the run's own ending comes first, whatever this was
            self._findings()["copy_dropped"] = f"not dropped: {drop_err}"
        super()._finish(err)


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
    "init-prod": InitProd,
    "rehearse": Rehearse,
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
    return begin(runbook, namespace, WORKFLOWS.get(runbook, Run))
