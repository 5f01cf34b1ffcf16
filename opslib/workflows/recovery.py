"""The recovery runbook: restore a backup and replay migrations, or stamp a revision after a manual fix."""

from __future__ import annotations

from pathlib import Path

from opslib import lazy, params
from opslib.display import Section
from opslib.errors import (
    InvalidInput,
    PreconditionFailed,
    VerificationFailed,
)
from opslib.naming import first_line
from opslib.params import Param
from opslib.record import BackupRef, revisions_text
from opslib.steps import step
from opslib.workflows.workflow import Workflow

# Loaded at first use: the registry is read by processes that never run a step (see opslib.lazy).
backup = lazy.module("opslib.backup")
migrate = lazy.module("opslib.migrate")


class Recovery(Workflow):
    """The guide's recovery procedures: restore a backup and replay migrations, or stamp after a manual fix."""

    runbook = "recovery"
    listed = 3
    about = "restore a backup and replay migrations, or stamp the revision a manual fix left"
    parameters = (
        params.URL_ENV,
        Param(
            "mode",
            str,
            "restore",
            "restore: restore a backup and replay; stamp: record a revision after a manual fix",
            ("restore", "stamp"),
        ),
        Param("backup_file", str, "", "backup to restore (empty: the newest verified backup of this database)"),
        Param(
            "target_revision",
            str,
            "head",
            "revision to replay migrations to after the restore (empty: none)",
            revision=True,
        ),
        Param("terminate_connections", bool, False, "end other sessions on the database before replacing it"),
        Param("stamp_revision", str, "", "for mode stamp: the revision the database is now at", revision=True),
        Param("reason", str, "", "for mode stamp: why, for the record (required)"),
        params.CONFIRM,
    )
    steps = ("preflight", "restore", "replay", "stamp", "verify")

    @classmethod
    def check_values(cls, values: dict) -> None:
        """A stamp needs the revision it records and a reason."""
        if values["mode"] != "stamp":
            return
        if not values["stamp_revision"]:
            raise InvalidInput("recovery: mode='stamp' needs stamp_revision, the revision the database is now at")
        if not values["reason"].strip():
            raise InvalidInput("recovery: mode='stamp' needs a reason, kept in the record")

    backup_file: Path | None = None
    manifest: dict = {}

    @step()
    def preflight(self) -> Section:
        """Identify the target and show what will be done: the backup to restore, or the revision to stamp."""
        facts = self._identify()
        if self.params["mode"] == "stamp":
            if self.settings.env == "production":
                self._require_confirm("stamp in production")
            info = migrate.show(self.target, self.params["stamp_revision"])
            facts += [("stamp", f"{info.revision} ({first_line(info.message)})"), ("reason", self.params["reason"])]
            return Section("Preflight", "stamp after a manual fix", facts)
        self._require_confirm("replaces the database and")
        self.backup_file = self._choose_backup()
        backup.verify_backup(self.target, self.backup_file, record=False).raise_for_failure()
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

    @step()
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

    @step()
    def replay(self) -> Section:
        """Replay migrations from the restored revision up to target_revision."""
        if self.params["mode"] != "restore" or not self.params["target_revision"]:
            return Section.skip(
                "Replay",
                "mode=stamp" if self.params["mode"] != "restore" else "no target_revision",
            )
        _, pending = migrate.plan(self.target, "upgrade", self.params["target_revision"])
        if not pending:
            return Section("Replay", "nothing to do: the restored database is at the target")
        result = migrate.upgrade(
            self.target,
            pending[-1].revision,
            on_step=self._steps_recorder("upgrade"),
            on_attempt=self._attempt_recorder(),
        )
        return self._migrated("Replay", f"applied {len(result.steps)} revision(s)", result)

    @step()
    def stamp(self) -> Section:
        """Record stamp_revision as the database's revision (mode=stamp), with the reason in the record."""
        if self.params["mode"] != "stamp":
            return Section.skip("Stamp", "mode=restore")
        result = migrate.stamp(self.target, self.params["stamp_revision"])
        facts = [
            ("before", revisions_text(result.before)),
            ("after", revisions_text(result.after)),
            ("reason", self.params["reason"]),
        ]
        return Section("Stamp", "stamped", facts)

    @step(repeatable=True)
    def verify(self) -> Section:
        """The database is at the revision the recovery was to leave it at."""
        if self.params["mode"] == "stamp":
            expected = tuple(r.revision for r in [migrate.show(self.target, self.params["stamp_revision"])])
        elif self.params["target_revision"]:
            _, pending = migrate.plan(self.target, "upgrade", self.params["target_revision"])
            if pending:
                raise VerificationFailed(f"{len(pending)} revision(s) still pending after the replay")
            return Section("Verify", "passed", [("revision", revisions_text(self._revisions_now()))])
        else:
            expected = tuple(self.manifest["revisions"])
        return Section("Verify", "passed", [self._expect_revisions(expected)])
