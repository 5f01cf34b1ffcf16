"""The deploy runbook (the guide's `make deploy-prod`): preflight, backup, upgrade, verify."""

from __future__ import annotations

from pathlib import Path

from opslib import approval, audit, lazy, params, signatures
from opslib.display import Section, findings_tables, show_now, shown_detail
from opslib.errors import (
    InvalidInput,
    MigrationFailed,
    PreconditionFailed,
)
from opslib.policy import load_approval_policy
from opslib.naming import first_line
from opslib.params import Param
from opslib.record import revisions_text
from opslib.steps import step
from opslib.workflows.workflow import Workflow

# Loaded at first use: the registry is read by processes that never run a step (see opslib.lazy).
checks = lazy.module("opslib.checks")
db = lazy.module("opslib.db")
lint = lazy.module("opslib.lint")
migrate = lazy.module("opslib.migrate")
plans = lazy.module("opslib.plans")


class Deploy(Workflow):
    """The guide's `make deploy-prod`: preflight, backup, upgrade, verify."""

    runbook = "deploy"
    listed = 1
    about = "upgrade to a revision, after a preflight and a verified backup; verify after"
    parameters = (
        params.URL_ENV,
        Param("target_revision", str, "head", "revision to upgrade to", revision=True),
        params.BACKUP,
        params.BACKUP_METHOD,
        Param("restore_test", bool, False, "verify the backup by restoring it into a scratch database"),
        Param(
            "on_failure",
            str,
            "stop",
            "stop: stay at the last committed revision; restore: restore the backup",
            ("stop", "restore"),
        ),
        params.DEV_DATA,
        Param("plan", str, "", "an approved plan file (opslib plan, then opslib approve): the run must match it"),
        params.CONFIRM,
    )
    steps = ("preflight", "backup", "upgrade", "verify")
    backup_gated = True

    @classmethod
    def check_values(cls, values: dict) -> None:
        """A restore on failure needs the backup it restores."""
        if values["on_failure"] == "restore" and not values["backup"]:
            raise InvalidInput("deploy: on_failure='restore' needs backup=True: there is nothing to restore otherwise")

    pending: list = []
    plan: migrate.DeployPlan | None = None
    approved: approval.Plan | None = None  # the plan this run is held to (-p plan)
    drift = None  # the preflight's comparison with the models, reused when nothing is applied

    @step()
    def preflight(self) -> Section:
        """Identify the target, run the pre-deploy checks (heads, lint, naming, backup…), list what will run and its SQL."""
        facts = self._identify()
        if self.settings.env == "production":
            self._require_confirm("in production")
        report = checks.pre_deploy(
            self.target,
            self.params["target_revision"],
            backup_planned=self.params["backup"],
            backup_method=self.params["backup_method"],
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
        facts += self._hold_to_plan(facts, check_rows + pending_rows, sql, found)
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

    def _hold_to_plan(self, facts: list, rows: list, sql: str, found: list) -> list[tuple[str, object]]:
        """Hold the run to its approved plan (``-p plan``) and count the plan's approvals against the policy's
        ``[approvals]``: where approvals are needed, an operator without a key allowed_signers lists (who they
        are would be only a name), no plan, a plan that differs from the target or was used already, too few
        approvals, or only the operator's own, is refused (exit 3), shown first, naming what differs or is
        missing. Returns the facts to show."""
        needs = load_approval_policy(self.settings.alembic_ini)
        needed = needs.needed(self.settings.env)
        self.record.approvals_needed = needed or None
        signer, signing = signatures.ledger_signer(self.settings)
        # Said where it matters: a run with a key, a plan or approvals to count (a plain deploy shows no row).
        shown: list[tuple[str, object]] = [("ledger entries", signing)] if (
            self.settings.signing_key or needed or self.params["plan"]) else []  # fmt: skip

        def refuse(why: str) -> None:
            self._refuse_by_plan(facts + shown, rows, sql, found, why)

        if needed and signer is None:
            refuse(f"{self.settings.env} needs {needed} approval(s), and the operator's own key to sign the run "
                   f"(set OPSLIB_SIGNING_KEY to a key {needs.signers_file.name} lists): {signing}")  # fmt: skip
        if not self.params["plan"]:
            if needed:
                refuse(f"{self.settings.env} needs {needed} approval(s) of a plan: make one with `opslib plan --out "
                       "PLAN.json`, have it approved with `opslib approve PLAN.json`, and deploy with -p plan PLAN.json")
            return shown
        path = Path(self.params["plan"])
        self.approved = approved = approval.read_plan(path)
        self.record.plan = approved.to_dict()
        now = plans.plan_of(self.target, self.params["target_revision"], self.params, env=self.settings.env,
                            author=self.settings.operator, created_at=audit.iso(audit.now()), planned=self.plan)  # fmt: skip
        judged = approval.judge(approved, approval.read_approvals(path), needs.signers_file,
                                operators=approval.operators_of(approved, signer.principal if signer else None,
                                                                self.settings.operator),
                                self_approval=needs.self_approval)  # fmt: skip
        self.record.approvals = (self.record.approvals or []) + judged
        self._save()
        shown += [("plan", f"{path.name}: sha256 {approved.sha256[:16]}…, made by {approved.author} at {approved.created_at}"),
                  ("approvals", approval.approvals_text(judged, needed))]  # fmt: skip
        differs = approval.differences(approved, now) + self._used_already(approved)
        if differs:
            refuse(f"the plan {path.name} does not match: {'; '.join(differs)}")
        counted = approval.counted(judged)
        if counted < needed:
            verified = [a for a in judged if a.verified]
            own = bool(verified) and all(approval.verdict_of(a) is approval.Verdict.OWN for a in verified)
            why = ("approved only by its operator (self-approval is off)" if own
                   else f"{counted} valid approval(s), {self.settings.env} needs {needed}")  # fmt: skip
            refuse(f"the plan {path.name} is {why}: {approval.approvals_text(judged, needed)}")
        return shown

    def _used_already(self, plan: approval.Plan) -> list[str]:
        """A plan is approved for one deploy: one that already succeeded with it is named (its run id)."""
        done = [e.get("run_id") for e in audit.read_endings(self.settings.records_dir)
                if e.get("plan_sha256") == plan.sha256 and e.get("outcome") == "succeeded"]  # fmt: skip
        return [f"the plan was used already, by run {done[0]}: a plan is approved for one deploy"] if done else []

    def _refuse_by_plan(self, facts: list, rows: list, sql: str, found: list, why: str) -> None:
        show_now(Section("Preflight", f"refused: {why}", facts, rows, sql, tables=found))
        raise PreconditionFailed(f"deploy refused: {why}")

    @step()
    def backup(self) -> Section:
        """Back up and verify before changing anything (skipped when nothing is pending)."""
        if not self.pending:
            return Section.skip("Backup", "nothing to deploy")
        return self._take_backup(f"before deploy {self.record.run_id}")

    @step()
    def upgrade(self) -> Section:
        """Apply the pending revisions under the lock, each committing on its own; on failure stop, or restore the backup."""
        if not self.pending:
            return Section.skip("Upgrade", "nothing to deploy")
        if self.approved is not None:  # still what was approved: nothing edited or moved since the preflight compared
            self._require_still_as_approved(self.approved)
        try:
            result = migrate.upgrade(
                self.target,
                self.pending[-1].revision,
                x_args=["dev_data=true"] if self.params["dev_data"] else [],
                on_attempt=self._attempt_recorder(),
                on_step=self._steps_recorder("upgrade"),
            )
        except MigrationFailed as err:
            if self.params["on_failure"] != "restore":
                raise
            point = self.record.backup.restore_point
            if point is not None:  # a physical gate is recovered by the recovery runbook, with its own checks
                raise MigrationFailed(
                    f"{err.message} on_failure=restore: recover to the gate with `opslib run recovery -p mode pitr "
                    f"-p restore_point {point.name} -p confirm {self.database}`",
                    changed=err.changed,
                    revisions=err.revisions,
                    output=err.output,
                ) from err
            restored = self._restore_over_target(self.record.backup.path, terminate=True)
            raise MigrationFailed(
                f"{err.message} on_failure=restore: the pre-deploy backup was restored, the database is back at "
                f"{revisions_text(restored.revisions)} (the failed state is kept as {restored.replaced_database_kept_as})",
                changed=True,
                revisions=restored.revisions,
                output=err.output,
            ) from err
        return self._migrated("Upgrade", f"applied {len(result.steps)} revision(s)", result)

    def _require_still_as_approved(self, plan: approval.Plan) -> None:
        with db.connect(self.url) as conn:
            current = tuple(migrate.current_revisions(conn, self.target.version_table(conn)))
        env_py = approval.file_sha256(Path(self.target.script.dir) / "env.py")
        approval.require_unchanged(plan, Path(self.settings.alembic_ini).resolve().parent, current, env_py)

    @step(repeatable=True)
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
