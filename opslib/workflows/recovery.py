"""The recovery runbook: restore a backup and replay migrations, recover to a point in time with pgBackRest,
or stamp a revision after a manual fix."""

from __future__ import annotations

import re
import time
from pathlib import Path

from opslib import audit, lazy, params
from opslib.display import Section
from opslib.errors import (
    ChecksFailed,
    Interrupted,
    InvalidInput,
    OpsError,
    PreconditionFailed,
    VerificationFailed,
)
from opslib.naming import first_line
from opslib.outcome import Outcome
from opslib.params import Param
from opslib.record import BackupRef, revisions_text
from opslib.steps import step
from opslib.workflows.workflow import Workflow

# Loaded at first use: the registry is read by processes that never run a step (see opslib.lazy).
backup = lazy.module("opslib.backup")
migrate = lazy.module("opslib.migrate")
physical = lazy.module("opslib.backup.physical")
db = lazy.module("opslib.db")
embedded = lazy.module("opslib.embedded")
schema = lazy.module("opslib.schema")
restorepoints = lazy.module("opslib.restorepoints")
pitr = lazy.module("opslib.backup.pitr")
pgbackrest = lazy.module("opslib.pgbackrest")
recovered = lazy.module("opslib.backup.recovered")
sa = lazy.module("sqlalchemy")


LSN = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")  # as PostgreSQL writes one: 0/3000090
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")  # a time begins with its date (PostgreSQL's words, 'yesterday', pgBackRest refuses)


class Recovery(Workflow):
    """The guide's recovery procedures: restore a backup and replay migrations, or stamp after a manual fix."""

    runbook = "recovery"
    listed = 3
    about = "restore a backup and replay migrations, recover to a point in time, or stamp after a manual fix"
    parameters = (
        params.URL_ENV,
        Param(
            "mode",
            str,
            "restore",
            "restore: restore a backup and replay; pitr: recover to a restore point, time or LSN (pgBackRest); "
            "stamp: record a revision after a manual fix",
            ("restore", "pitr", "stamp"),
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
        Param(
            "restore_point",
            str,
            "",
            "for mode pitr: opslib-<run id> or the run id (empty: the newest of this database, unless a time or LSN)",
        ),
        Param("target_time", str, "", "for mode pitr: recover to this time instead (2026-12-07 10:00:00+00)"),
        Param("target_lsn", str, "", "for mode pitr: recover to this LSN instead (0/3000090)"),
        Param(
            "apply",
            str,
            "in_place",
            "for mode pitr: in_place: swap the server's data folder (embedded server); new_database: copy it beside",
            ("in_place", "new_database"),
        ),
        Param("new_database", str, "", "for apply new_database: its name (empty: <database>_pitr_<run id>)"),
        params.CONFIRM,
    )
    steps = ("preflight", "restore", "replay", "stamp", "verify")

    @classmethod
    def check_values(cls, values: dict) -> None:
        """A stamp needs the revision it records and a reason; a point in time is one of a restore point, a
        time and an LSN."""
        if values["mode"] == "pitr" and sum(bool(values[k]) for k in ("restore_point", "target_time", "target_lsn")) > 1:
            raise InvalidInput("recovery: mode='pitr' takes one of restore_point, target_time, target_lsn")
        if values["target_time"] and not DATE.match(values["target_time"]):
            raise InvalidInput(
                f"recovery: target_time {values['target_time']!r} is not a time: write it as 2026-12-07 10:00:00+00"
            )
        if values["target_lsn"] and not LSN.match(values["target_lsn"]):
            raise InvalidInput(
                f"recovery: target_lsn {values['target_lsn']!r} is not an LSN: two hexadecimal numbers, as 0/3000090"
            )
        if values["mode"] != "stamp":
            return
        if not values["stamp_revision"]:
            raise InvalidInput("recovery: mode='stamp' needs stamp_revision, the revision the database is now at")
        if not values["reason"].strip():
            raise InvalidInput("recovery: mode='stamp' needs a reason, kept in the record")

    backup_file: Path | None = None
    manifest: dict = {}
    point = None  # mode pitr: the restore point recovered to (None: a time or an LSN)
    recovery_target = None
    new_database_name: str | None = None

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
        if self.params["mode"] == "pitr":
            return self._preflight_pitr(facts)
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

    def _preflight_pitr(self, facts: list) -> Section:
        self._require_confirm("recovers the database to a point in time and")
        p = self.params
        if not (p["target_time"] or p["target_lsn"]):
            self.point = restorepoints.find_restore_point(self.settings.records_dir, self.database, p["restore_point"])
        if p["target_time"]:
            self._check_time(p["target_time"])
        self.recovery_target = pitr.target_of(self.point, p["target_time"], p["target_lsn"])
        stanza = physical.stanza_for(self.settings, physical.backup_policy(self.settings))  # refused if there is none
        if self.point is not None:
            kept = {b.label for b in pgbackrest.info(stanza, error=PreconditionFailed).backups}
            if self.point.backup_label not in kept:
                raise PreconditionFailed(
                    f"the backup {self.point.backup_label} that {self.point.name} is recovered from was expired "
                    "(prune-backups): recover to a later restore point, a target_time or a target_lsn"
                )
        if p["apply"] == "in_place":
            self._check_in_place()
        else:
            self.new_database_name = recovered.check_new_database(
                self.target, p["new_database"] or f"{self.database}_pitr_{self.record.run_id[:8]}"
            )
        facts.append(("recover to", self.recovery_target.describe()))
        if self.point is not None:
            pt = self.point
            facts += [
                ("made at", f"{pt.created_at}, LSN {pt.lsn}"),
                ("from backup", f"{pt.stanza}/{pt.backup_label}"),
                ("revision there", revisions_text(list(pt.revisions))),
            ]
        facts.append(
            ("then", "swap the server's data folder (the whole server goes back; the current folder is kept)"
             if p["apply"] == "in_place" else f"copy the recovered database into a new database {self.new_database_name}")
        )  # fmt: skip
        return Section("Preflight", "recover to a point in time (pgBackRest)", facts)

    def _check_time(self, text: str) -> None:
        """A target time the server reads as a time, else exit 2 before anything is restored."""
        with db.connect(self.url) as conn:
            try:
                with conn.begin_nested():
                    conn.execute(sa.text("SELECT CAST(:t AS timestamptz)"), {"t": text})
            except sa.exc.DBAPIError:
                raise InvalidInput(f"target_time {text!r} is not a time: write it as 2026-12-07 10:00:00+00") from None

    def _check_in_place(self) -> None:
        """In place recovers the whole server: only the embedded one, and only while it holds no other database."""
        if not embedded.is_target(self.settings):
            raise PreconditionFailed(
                "recovery in place swaps the embedded server's data folder only: use -p apply new_database"
            )
        others = recovered.other_databases(self.target)
        if others:
            raise PreconditionFailed(
                f"recovery in place takes the whole server back, and it holds other databases too ({', '.join(others)}): "
                "use -p apply new_database"
            )

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
        if self.params["mode"] == "pitr":
            return self._recover_to_point()
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

    def _recover_to_point(self) -> Section:
        """Recover into a staging folder, compare with the gate, then put it in place or copy it beside."""
        policy = physical.backup_policy(self.settings)
        stanza = physical.stanza_for(self.settings, policy)
        major = self._server_major()
        began = self._phase_start()
        staging = pitr.recover(self.target, stanza, self.recovery_target, self.record.run_id, major)
        self._phase(f"recover to {self.recovery_target.describe()}", began)
        try:
            began = self._phase_start()
            compared = pitr.compare(staging, self.target.url, self.point)
            if compared.differences:
                raise ChecksFailed(
                    f"the recovered database is not as recorded at {self.recovery_target.describe()}: "
                    f"{'; '.join(compared.differences)}; the database was not touched"
                )
            self._phase("compare with the gate", began)
            facts = [
                ("recovered to", self.recovery_target.describe()),
                ("restore", f"{staging.seconds_restore:.1f} s (pgBackRest), replay and start {staging.seconds_replay:.1f} s"),
                *compared.facts,
            ]
            if self.params["apply"] == "in_place":
                facts += self._put_in_place(staging)
            else:
                began = self._phase_start()
                recovered.copy_as_new_database(self.target, staging, self.new_database_name, major)
                self._phase(f"copy into {self.new_database_name}", began)
                facts.append(("new database", f"{self.new_database_name} (the target was not touched)"))
        finally:
            staging.remove()
        self._save()
        return Section("Restore", "recovered to " + self.recovery_target.describe(), facts)

    def _put_in_place(self, staging) -> list[tuple[str, object]]:
        """Swap the data folders without the run lock's session (the server stops), then take the lock again; a
        signal that came during the swap is raised once the swap is recorded."""
        began = self._phase_start()
        self._release_lock()
        swapped = recovered.put_in_place(self.settings, staging, self.record.run_id)
        self._phase("put in place", began)
        if self.point is not None:
            self.record.backup = BackupRef(physical.backup_path(self.point), "", self.point)
        self.record.database_history = "the database's opslib history now ends at the recovery point; this run's rows follow it"
        self._save()
        facts: list[tuple[str, object]] = [("replaced data folder kept as", str(swapped.kept))]
        if swapped.signal is not None:
            raise Interrupted(
                swapped.signal,
                f"interrupted after the recovered data folder was put in place (the replaced one kept as {swapped.kept})",
            )
        try:
            self._take_lock()
        except OpsError as err:  # the swap is done: another run took the lock meanwhile, which the record says
            facts.append(("run lock", f"not taken again: {err.message}"))
        return facts

    @staticmethod
    def _phase_start() -> tuple[str, float]:
        return audit.iso(audit.now()), time.monotonic()

    def _phase(self, name: str, began: tuple[str, float]) -> None:
        """Record one phase of a recovery to a point as a step of its own (the auditor sees each), and save."""
        self.record.step(name, began[0], duration_s=round(time.monotonic() - began[1], 3), outcome=Outcome.SUCCEEDED)
        self._save()

    def _server_major(self) -> int:
        with db.connect(self.url) as conn:
            return db.server_version(conn)[1]

    @step()
    def replay(self) -> Section:
        """Replay migrations from the restored revision up to target_revision."""
        if self.params["mode"] != "restore" or not self.params["target_revision"]:
            why = {"stamp": "mode=stamp", "pitr": "mode=pitr: the database is left as it was at the point"}
            return Section.skip("Replay", why.get(self.params["mode"], "no target_revision"))
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
            return Section.skip("Stamp", f"mode={self.params['mode']}")
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
        if self.params["mode"] == "pitr":
            return self._verify_pitr()
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

    def _verify_pitr(self) -> Section:
        """In place: the database is at the point's revision and schema; beside: the new database is."""
        url = self.url if self.params["apply"] == "in_place" else self.url.set(database=self.new_database_name)
        table = tuple(self.record.version_table or db.DEFAULT_VERSION_TABLE)
        with db.connect(url) as conn:
            revisions = db.version_revisions(conn, table)
            shape = schema.fingerprint(conn, table)
        facts = [("database", url.database), ("revision", revisions_text(list(revisions)))]
        if self.point is not None:
            if tuple(revisions) != tuple(self.point.revisions) or shape != self.point.fingerprint:
                raise VerificationFailed(
                    f"{url.database} is at {revisions_text(list(revisions))} with another schema than at {self.point.name}"
                )
            facts.append(("schema", "as at the restore point"))
        return Section("Verify", "passed", facts)
