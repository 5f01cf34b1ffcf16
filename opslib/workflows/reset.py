"""The reset runbook (the guide's `make db-reset`): tear the schema down and build it again (never in production)."""

from __future__ import annotations

from opslib import audit, lazy, params
from opslib.display import Section
from opslib.errors import (
    MigrationFailed,
)
from opslib.outcome import Outcome
from opslib.params import Param
from opslib.record import SchemaRecreated, revisions_text
from opslib.steps import step
from opslib.workflows.workflow import Workflow

# Loaded at first use: the registry is read by processes that never run a step (see opslib.lazy).
db = lazy.module("opslib.db")
migrate = lazy.module("opslib.migrate")
run_history = lazy.module("opslib.history")


class Reset(Workflow):
    """The guide's `make db-reset`: everything down, everything up, sample data again."""

    runbook = "reset"
    listed = 4
    about = "tear the schema down and build it again from the migrations (refused in production)"
    parameters = (
        params.URL_ENV,
        Param("backup", bool, False, "take and verify a backup first"),
        params.BACKUP_METHOD,
        Param("dev_data", bool, True, "load the development sample data again (the -x dev_data flag of Alembic)"),
        Param(
            "recreate_schema",
            str,
            "on_failure",
            "on_failure: downgrade, recreate schema public only if a downgrade fails; always: skip the "
            "downgrades; never: stop at a failed downgrade",
            ("on_failure", "always", "never"),
        ),
        params.CONFIRM,
    )
    steps = ("preflight", "backup", "teardown", "recreate_schema", "rebuild", "verify")
    allowed_in_production = False

    downgrade_failure: MigrationFailed | None = None

    @step()
    def preflight(self) -> Section:
        """Identify the target; in staging the name must be confirmed (production was refused at start)."""
        facts = self._identify()
        if self.settings.env == "staging":
            self._require_confirm("in staging")
        facts.append(("dev_data", "yes (-x dev_data=true)" if self.params["dev_data"] else "no"))
        return Section("Preflight", "reset: downgrade to base, upgrade to head", facts)

    @step()
    def backup(self) -> Section:
        """Optionally back up first (backup=True)."""
        return self._take_backup(f"before reset {self.record.run_id}")

    @step()
    def teardown(self) -> Section:
        """Downgrade to base (unless recreate_schema=always). A failed downgrade is recorded as a failed step of
        its own; with recreate_schema=never it ends the run, else the schema is recreated in the next step."""
        if self.params["recreate_schema"] == "always":
            return Section.skip("Teardown", "recreate_schema=always (the next step recreates the schema)")
        if not self.record.revisions_before:
            return Section("Teardown", "nothing to do: the database is at base")
        try:
            result = migrate.downgrade(
                self.target,
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
            return Section.skip(
                "Recreate schema",
                "recreate_schema=never" if mode == "never" else "every downgrade ran",
            )
        why = (
            "recreate_schema=always"
            if mode == "always"
            else f"a downgrade failed: {self.downgrade_failure.message}"
        )
        with db.connect(self.target.url) as conn:
            before = migrate.current_revisions(conn, self.target.version_table(conn))
            done = db.recreate_schema(conn, "public")
            run_history.record_event(
                conn, self.record.run_id, "(schema public)", before, (), "recreate schema",
                f"dropped {len(done.dropped)} object(s): {why}",
            )  # fmt: skip
            conn.commit()
        self.record.schema_recreated = SchemaRecreated(why, tuple(done.dropped), schema="public")
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

    @step()
    def rebuild(self) -> Section:
        """Upgrade to head, loading the sample data when dev_data is on."""
        x_args = ["dev_data=true"] if self.params["dev_data"] else []
        result = migrate.upgrade(
            self.target,
            "head",
            x_args=x_args,
            on_step=self._steps_recorder("upgrade"),
            on_attempt=self._attempt_recorder(),
        )
        return self._migrated("Rebuild", f"applied {len(result.steps)} revision(s)", result)

    @step(repeatable=True)
    def verify(self) -> Section:
        """The database is at head and matches the models."""
        facts = [self._expect_revisions(tuple(h.revision for h in migrate.heads(self.target)))]
        facts.append(self._models_fact())
        return Section("Verify", "passed", facts)
