"""What the runbooks' workflows share: confirming the target, backups, restores over the target,
showing a migration's result, and checking where the database stands."""

from __future__ import annotations

from opslib import lazy
from opslib.display import Section
from opslib.errors import (
    BackupMethodUnavailable,
    PreconditionFailed,
    VerificationFailed,
)
from opslib.naming import first_line
from opslib.record import BackupRef, revisions_text
from opslib.steps import Run

# Loaded at first use: the registry is read by processes that never run a step (see opslib.lazy).
backup = lazy.module("opslib.backup")
physical = lazy.module("opslib.backup.physical")
migrate = lazy.module("opslib.migrate")

OUTPUT_TAIL = 20  # lines of the migrations' own output shown in a step's section


class Workflow(Run):
    """What the four runbooks' steps share: confirming the target, backups, restores over the target,
    showing a migration's result, and checking where the database stands."""

    def _restore_over_target(self, path, terminate: bool):
        """Restore a backup over the target: the run lock's own session is let go for the swap, then taken again."""
        self._release_lock()
        try:
            return backup.restore(self.target, path, confirm=self.database, terminate_connections=terminate)
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
        policy = physical.backup_policy(self.settings)
        fell_back = None
        if (self.params.get("backup_method") or policy.method) == "pgbackrest":
            try:
                return self._take_gate(policy)
            except BackupMethodUnavailable as err:
                if policy.fallback != "dump":
                    raise
                fell_back = f"pgbackrest cannot work here ({err.message}); the policy falls back to a dump"
        section = self._take_dump(label)
        if fell_back:
            section.facts.insert(0, ("method", fell_back))
        return section

    def _take_gate(self, policy) -> Section:
        """The pgBackRest gate: a backup when the policy's ages ask for one, and this run's restore point."""
        point = physical.gate(self.target, self.record.run_id, self.target.version_table(), policy)
        self.record.backup = BackupRef(physical.backup_path(point), "", point)
        self._save()
        app = {k: v for k, v in (point.row_counts or {}).items() if not k.startswith("opslib.")}
        taken = {"full": "a full backup, taken now", "incr": "an incremental backup, taken now"}.get(
            point.backup_taken, "the newest, recent enough (policy)"
        )
        return Section(
            "Backup",
            f"restore point {point.name} made and archived",
            [
                ("method", "pgbackrest: a physical backup and a named restore point (WAL archived)"),
                ("restore point", f"{point.name} at LSN {point.lsn}, {point.created_at}"),
                ("WAL segment", f"{point.wal_file}, archived"),
                ("pgBackRest backup", f"{point.stanza}/{point.backup_label}: {taken}"),
                ("revision", revisions_text(list(point.revisions))),
                ("tables / rows", f"{len(app)} / {sum(app.values())}" if point.row_counts is not None else "not counted (policy)"),
                ("gate", f"{point.gate_s:.2f} s (restore point, WAL switch, archived); backup {point.backup_s:.1f} s"),
            ],
        )

    def _take_dump(self, label: str) -> Section:
        made = backup.backup(self.target, label=label)
        report = backup.verify_backup(
            self.target, made.path, restore_test=self.params.get("restore_test", False)
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
                ("method", "dump: pg_dump -Fc, verified"),
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
        heads = {h.revision for h in migrate.heads(self.target)}
        now = self._revisions_now()
        if now is None:
            return ("models", "skip: the database's revision could not be read")
        if set(now) != heads:
            return ("models", "skip: compared only when the database is at head")
        status, detail = migrate.compare_models(self.target)
        if status == "fail":
            raise VerificationFailed(f"the database does not match the models: {detail}")
        return ("models", f"{status}: {detail}")
