"""The rollback runbook (the guide's `make rollback-prod` / `migrate-down`): reverse revisions, with a backup first."""

from __future__ import annotations

from opslib import lazy, params
from opslib.config import Settings
from opslib.display import Section
from opslib.errors import (
    InvalidInput,
    OpsError,
    PreconditionFailed,
)
from opslib.naming import first_line
from opslib.params import Param
from opslib.steps import step
from opslib.workflows.workflow import Workflow

# Loaded at first use: the registry is read by processes that never run a step (see opslib.lazy).
migrate = lazy.module("opslib.migrate")


class Rollback(Workflow):
    """The guide's `make rollback-prod` / `migrate-down`: reverse revisions, with a backup first."""

    runbook = "rollback"
    listed = 2
    about = "downgrade by steps or to a revision, after a verified backup; verify after"
    parameters = (
        params.URL_ENV,
        Param("steps", int, 1, "how many revisions to roll back (ignored when target_revision is set)"),
        Param("target_revision", str, "", "revision to roll back to (empty: use steps)", revision=True),
        params.BACKUP,
        params.BACKUP_METHOD,
        Param(
            "acknowledge_irreversible",
            str,
            "",
            "ids of revisions whose downgrade does nothing, comma-separated: their changes stay in the database",
        ),
        params.CONFIRM,
    )
    steps = ("preflight", "backup", "downgrade", "verify")
    backup_gated = True

    @classmethod
    def check_values(cls, values: dict) -> None:
        """At least one step back, and revision ids where revisions are acknowledged."""
        if not values["target_revision"] and values["steps"] < 1:
            raise InvalidInput(f"rollback: steps must be at least 1, not {values['steps']}")
        params.check_revision_list("rollback", "acknowledge_irreversible", values["acknowledge_irreversible"])

    reversing: list = []

    @property
    def destination(self) -> str:
        """The revision the downgrade goes to: the one given, else -steps."""
        return self.params["target_revision"] or f"-{self.params['steps']}"

    @step()
    def preflight(self) -> Section:
        """Identify the target, list the revisions to reverse and their SQL; refuse irreversible ones."""
        facts = self._identify()
        if self.settings.env == "production":
            self._require_confirm("in production")
        current, self.reversing = migrate.plan(self.target, "downgrade", self.destination)
        facts.append(("roll back to", self.destination))
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

    @step()
    def backup(self) -> Section:
        """Back up and verify before reversing anything."""
        if not self.reversing:
            return Section.skip("Backup", "nothing to roll back")
        return self._take_backup(f"before rollback {self.record.run_id}")

    @step()
    def downgrade(self) -> Section:
        """Reverse the revisions under the lock, each committing on its own."""
        if not self.reversing:
            return Section.skip("Downgrade", "nothing to roll back")
        result = migrate.downgrade(
            self.target,
            self.destination,
            on_step=self._steps_recorder("downgrade"),
            on_attempt=self._attempt_recorder(),
        )
        return self._migrated("Downgrade", f"reversed {len(result.steps)} revision(s)", result)

    @step(repeatable=True)
    def verify(self) -> Section:
        """The database is where the rollback was to leave it."""
        before = self.record.revisions_before
        if not self.reversing:
            return Section("Verify", "passed", [self._expect_revisions(tuple(before))])
        last = self.reversing[-1]
        return Section("Verify", "passed", [self._expect_revisions(tuple(last.down_revisions))])



def _offline(settings: Settings, revision_range: str) -> str:
    try:
        return migrate.offline_sql(settings, revision_range)
    except OpsError as err:
        return f"-- the SQL cannot be rendered offline: {err.message}"
