"""The init-prod runbook (the guide's `make init-prod`): the schema at head, then the production essentials."""

from __future__ import annotations

from opslib import lazy, params
from opslib.display import Section
from opslib.errors import (
    InvalidInput,
    PreconditionFailed,
    VerificationFailed,
)
from opslib.params import Param
from opslib.record import revisions_text
from opslib.steps import step
from opslib.workflows.workflow import Workflow

# Loaded at first use: the registry is read by processes that never run a step (see opslib.lazy).
db = lazy.module("opslib.db")
migrate = lazy.module("opslib.migrate")
seed = lazy.module("opslib.seed")


class InitProd(Workflow):
    """The guide's `make init-prod`: the schema at head, then the production essentials (admin user,
    settings, CMS pages, email templates), each inserted only when absent."""

    runbook = "init-prod"
    listed = 6
    about = "the schema to head, then the admin user, settings, CMS pages and email templates when absent"
    parameters = (
        params.URL_ENV,
        Param("admin_email_env", str, "OPSLIB_ADMIN_EMAIL", "name of the environment variable holding the admin's email"),
        Param(
            "admin_password_env",
            str,
            "OPSLIB_ADMIN_PASSWORD",
            "name of the environment variable holding the admin's password (stored only as a salted hash)",
        ),
    )
    steps = ("preflight", "schema", "insert_essentials", "verify")

    @classmethod
    def check_values(cls, values: dict) -> None:
        """The admin's variables are named by environment variable names, never given as values."""
        for name in ("admin_email_env", "admin_password_env"):
            if not params.ENV_NAME.match(values[name]):
                raise InvalidInput(
                    f"init-prod: {name} names an environment variable (e.g. OPSLIB_ADMIN_EMAIL), not {values[name]!r}"
                )

    essentials: seed.Essentials | None = None
    at_base = False

    def _check_inputs(self) -> None:
        # Before any connection: a missing admin variable ends the run here (exit 2). The values stay in
        # this process's environment; neither reaches the record, the notebook or a message.
        seed.admin_credentials(self.params["admin_email_env"], self.params["admin_password_env"])

    @step()
    def preflight(self) -> Section:
        """Identify the target; it must be empty (at base) or at head: pending revisions are the deploy's."""
        facts = self._identify()
        self.essentials = seed.load_essentials(self.settings)
        heads = tuple(sorted(h.revision for h in migrate.heads(self.target)))
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

    @step()
    def schema(self) -> Section:
        """Upgrade an empty database to head (skipped when it is at head already)."""
        if not self.at_base:
            return Section.skip("Schema", "already at head")
        result = migrate.upgrade(
            self.target, "head", on_step=self._steps_recorder("upgrade"), on_attempt=self._attempt_recorder()
        )
        return self._migrated("Schema", f"applied {len(result.steps)} revision(s)", result)

    @step("essentials")
    def insert_essentials(self) -> Section:
        """Insert the missing essentials in one transaction; present rows are left as they are."""
        email, password = seed.admin_credentials(self.params["admin_email_env"], self.params["admin_password_env"])
        with db.connect(self.target.url) as conn:
            outcomes = seed.apply_essentials(conn, self.essentials, email, password)
            conn.commit()
        self.record.data_changes = outcomes
        self._save()
        created = sum(o.created for o in outcomes)
        rows = [{"item": o.item, "table": o.table, "created": o.created, "already there": o.present} for o in outcomes]
        status = f"created {created} row(s)" if created else "nothing to do: every essential is there already"
        return Section("Essentials", status, [], rows)

    @step(repeatable=True)
    def verify(self) -> Section:
        """The database is at head, every essential row is there, and the admin's password is only a hash."""
        email, _ = seed.admin_credentials(self.params["admin_email_env"], self.params["admin_password_env"])
        facts = [self._expect_revisions(tuple(h.revision for h in migrate.heads(self.target)))]
        with db.connect(self.target.url) as conn:
            try:
                facts += seed.check_essentials(conn, self.essentials, email)
            except PreconditionFailed as err:
                raise VerificationFailed(err.message) from None
        return Section("Verify", "passed", facts)
