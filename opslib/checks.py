"""The pre-deploy checks (the guide's checklist) and the setup check, one function per check.

Each check returns a :class:`~opslib.checkreport.CheckResult`; :func:`pre_deploy` runs them in the
guide's order over one :class:`~opslib.migrate.DeployPlan`, which the deploy then reuses, so the
plan, its offline SQL and the revision map are worked out once per run.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from opslib import backup, db, lint, migrate, pgtools, policy
from opslib.checkreport import FAIL, PASS, SKIP, WARN, CheckReport, CheckResult
from opslib.config import Settings
from opslib.errors import InvalidInput, OpsError
from opslib.naming import vague_message


def verify_setup(settings: Settings) -> CheckReport:
    """The guide's `make verify-setup`: can opslib reach, migrate and back up this database?"""
    report = CheckReport("verify-setup")
    major = None
    try:
        url = db.target_url(settings)
        with db.connect(url) as conn:
            version, major = db.server_version(conn)
        report.add("connectivity", PASS, db.redact_url(url))
        report.add("server version", PASS, f"PostgreSQL {version}")
    except OpsError as err:
        report.add("connectivity", FAIL, err.message)
        report.add("server version", SKIP, "server not reached")
    if major is not None:
        report.checks.append(check_restore_leftovers(settings))
    for name, finder in (("pg_dump", pgtools.pg_dump_for), ("pg_restore", pgtools.pg_restore_for)):
        if major is None:
            report.add(f"{name} matching the server", SKIP, "server version unknown")
            continue
        try:
            tool = finder(major)
            report.add(f"{name} matching the server", PASS, f"{tool.path} ({tool.version})")
        except OpsError as err:
            report.add(f"{name} matching the server", FAIL, err.message)
    try:
        script = migrate.script_directory(settings)
        report.add("Alembic config loads", PASS, str(settings.alembic_ini))
        heads = script.get_heads()
        if len(heads) == 1:
            report.add("single head", PASS, heads[0])
        else:
            report.add(
                "single head", FAIL, f"{len(heads)} heads ({', '.join(heads)}): run `opslib merge -m MSG`"
            )
    except OpsError as err:
        report.add("Alembic config loads", FAIL, err.message)
        report.add("single head", SKIP, "no Alembic project")
    report.add("backups folder writable", *_writable(Path(settings.backups_dir)))
    return report


def _writable(folder: Path) -> tuple[str, str]:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".opslib-write-test-"):
            pass
        return PASS, str(folder.resolve())
    except OSError as err:
        return FAIL, f"{folder}: {err.strerror or err}"


@dataclass(frozen=True)
class Reached:
    """The target as the checks found it."""

    url: URL
    version: str
    major: int
    fingerprint: str
    blockers: list


def check_reachable(settings: Settings) -> tuple[CheckResult, Reached | None]:
    """Connect, and read the server's version, the database's fingerprint and long transactions."""
    try:
        url = db.target_url(settings)
        with db.connect(url) as conn:
            version, major = db.server_version(conn)
            fingerprint = db.fingerprint(conn)
            blockers = db.blocking_sessions(conn, older_than_s=settings.ddl_lock_timeout_s)
    except OpsError as err:
        return CheckResult("database reachable", FAIL, err.message), None
    reached = Reached(url, version, major, fingerprint, blockers)
    return CheckResult("database reachable", PASS, f"{fingerprint}, PostgreSQL {version}"), reached


def check_blocking_sessions(settings: Settings, reached: Reached) -> CheckResult:
    """Sessions in long transactions holding table locks, which migrations would queue behind."""
    if not reached.blockers:
        return CheckResult("sessions that would block DDL", PASS, "no long transaction holds a table lock")
    return CheckResult(
        "sessions that would block DDL",
        WARN,
        "; ".join(
            f"pid {b['pid']} ({b['application_name'] or 'no name'}, {b['state']}, in a transaction for "
            f"{b['seconds']} s, locking {b['tables']})"
            for b in reached.blockers[:5]
        )
        + f": migrations wait at most {settings.ddl_lock_timeout_s:g} s per attempt for them, then retry",
    )


def check_restore_leftovers(settings: Settings) -> CheckResult:
    """Staging databases that killed restores over the target left (``<target>_restoring_<hex>``).

    A warning, not a failure: they hold a full copy's disk space but do not make a deploy unsafe.
    Staging databases of restores running now are not leftovers and are not named.
    """
    try:
        left = backup.leftover_restores(settings)
    except OpsError as err:
        return CheckResult("leftover restores", SKIP, f"not read: {err.message}")
    if not left:
        return CheckResult("leftover restores", PASS, "no staging database left by a killed restore")
    names = ", ".join(s.name + (f" ({s.sessions} session(s) connected)" if s.sessions else "") for s in left)
    return CheckResult(
        "leftover restores",
        WARN,
        f"{len(left)} staging database(s) left by killed restores: {names}; each holds a full copy: "
        "drop them with `opslib restore --cleanup`",
    )


def check_invalid_indexes(reached: Reached) -> CheckResult:
    """No invalid index (``pg_index.indisvalid`` false) in the target: what a cancelled or failed
    ``CREATE INDEX CONCURRENTLY`` leaves. PostgreSQL never uses it but still maintains it on every
    write, and a revision's ``IF NOT EXISTS`` would skip it. One being built right now is a warning."""
    try:
        with db.connect(reached.url) as conn:
            found = db.invalid_indexes(conn)
            conn.rollback()
    except (OpsError, DBAPIError) as err:
        why = err.message if isinstance(err, OpsError) else db.driver_message(err, reached.url)
        return CheckResult("invalid indexes", FAIL, f"pg_index could not be read: {why}")
    broken = [i for i in found if i.building_pid is None]
    building = [i for i in found if i.building_pid is not None]
    if broken:
        names = ", ".join(f"{i.name} on {i.table}" for i in broken[:10])
        more = f" and {len(broken) - 10} more" if len(broken) > 10 else ""
        return CheckResult(
            "invalid indexes",
            FAIL,
            f"{len(broken)} invalid index(es) (a cancelled or failed concurrent build): {names}{more}; "
            f"drop with DROP INDEX CONCURRENTLY {broken[0].name} and run the revision that builds it again "
            f"(`opslib downgrade` / `opslib upgrade`), or rebuild it with REINDEX INDEX CONCURRENTLY {broken[0].name}",
        )
    if building:
        return CheckResult(
            "invalid indexes",
            WARN,
            "being built concurrently right now: "
            + ", ".join(f"{i.name} (pid {i.building_pid})" for i in building)
            + "; check again once the build has finished",
        )
    return CheckResult("invalid indexes", PASS, "every index is valid")


def check_environment(settings: Settings, expect_env: str | None) -> CheckResult:
    """OPSLIB_ENV is the label the caller expects."""
    if expect_env and expect_env != settings.env:
        return CheckResult(
            "environment label", FAIL, f"OPSLIB_ENV is {settings.env!r}, expected {expect_env!r}"
        )
    return CheckResult("environment label", PASS, settings.env)


def check_single_head(settings: Settings) -> CheckResult:
    """The Alembic project loads and has one head (several need a merge first)."""
    try:
        heads = migrate.script_directory(settings).get_heads()
    except OpsError as err:
        return CheckResult("Alembic project", FAIL, err.message)
    if len(heads) > 1:
        return CheckResult(
            "single head",
            FAIL,
            f'{len(heads)} heads: {", ".join(heads)}; join them with `opslib merge -m "merge heads" {" ".join(heads)}`',
        )
    return CheckResult("single head", PASS, heads[0] if heads else "no revisions")


def check_plan(settings: Settings, target: str) -> tuple[list[CheckResult], migrate.DeployPlan | None]:
    """The database's revision is one the code knows, and what the deploy to ``target`` applies."""
    try:
        plan = migrate.deploy_plan(settings, target)
    except InvalidInput:
        raise  # a target that names no revision is bad input (exit 2) on every path, not a failed check
    except OpsError as err:
        name = "database revision known" if "does not contain" in err.message else "target revision"
        detail = err.message
        if name == "database revision known":
            detail += (
                ". Out of sync: deploy the code that has this revision, or check the schema by hand and "
                "`opslib stamp` the revision it matches, or (development) run the reset runbook"
            )
        return [CheckResult(name, FAIL, detail)], None
    pending = plan.pending
    return [
        CheckResult("database revision known", PASS, ", ".join(plan.current) or "base"),
        CheckResult(
            "pending revisions",
            PASS,
            _listed(pending, lambda r: f"{r.revision} ({r.message})") if pending else "none: at the target",
        ),
    ], plan


def _listed(items, text, limit: int = 12) -> str:
    shown = ", ".join(text(i) for i in list(items)[:limit])
    more = f", and {len(items) - limit} more" if len(items) > limit else ""
    return f"{len(items)}: {shown}{more}"


def check_downgrades(plan: migrate.DeployPlan) -> CheckResult:
    """Every pending revision can be reversed (a ``pass`` downgrade cannot)."""
    irreversible = [r.revision for r in plan.pending if not migrate.has_real_downgrade(r)]
    if irreversible:
        return CheckResult(
            "downgrades", WARN, f"no real downgrade in {', '.join(irreversible)}: rolling back needs a backup"
        )
    return CheckResult("downgrades", PASS, "every pending revision has one")


def check_rendering(plan: migrate.DeployPlan) -> CheckResult:
    """The pending SQL renders offline, so it can be shown and linted (a revision that reads data cannot)."""
    unrendered = plan.sql.unrendered
    if unrendered:
        return CheckResult(
            "SQL renders offline",
            WARN,
            "; ".join(f"cannot render {rev} ({why})" for rev, why in unrendered) + ": linted without it",
        )
    return CheckResult("SQL renders offline", PASS, f"{len(plan.pending)} revision(s)")


def check_lint(
    settings: Settings, plan: migrate.DeployPlan, reached: Reached, baseline_reason: str | None = None
) -> tuple[CheckResult, list[lint.Finding]]:
    """squawk over the pending SQL, each finding judged against the target and the project's policy.

    With ``baseline_reason``, today's blocking findings are first written to the project's policy
    as accepted, with that reason (``opslib check --write-baseline``).
    """
    if not plan.sql.sql:
        return CheckResult("squawk lint", SKIP, "nothing to lint"), []
    files = {r.revision: r.path for r in plan.pending}

    def judged() -> list[lint.Finding]:
        with db.connect(reached.url) as conn:
            return lint.lint(
                plan.sql.sql,
                files,
                pg_version=reached.version.split()[0],
                policy=policy.load_policy(settings.alembic_ini),
                read_tables=lambda names: db.table_facts(conn, names, settings.ddl_lock_timeout_s),
            )

    findings = judged()
    written = ""
    if baseline_reason is not None:
        blocking = [(f.revision, f.rule) for f in findings if f.severity is lint.Severity.BLOCK]
        path, added = policy.write_baseline(settings.alembic_ini, blocking, baseline_reason)
        written = f"baseline: {added} finding(s) accepted in {path}"
        if added:
            findings = judged()
    return _lint_result(findings, written), findings


def _lint_result(findings: list[lint.Finding], written: str) -> CheckResult:
    by = {s: [f for f in findings if f.severity is s] for s in lint.Severity}
    parts = [written] if written else []
    if by[lint.Severity.BLOCK]:
        unique = list(
            dict.fromkeys(
                f"{f.revision}: {f.rule} on {f.context or 'no table'}: {f.message}"
                for f in by[lint.Severity.BLOCK]
            )
        )
        detail = "; ".join(unique[:5]) + (f"; and {len(unique) - 5} more" if len(unique) > 5 else "")
        return CheckResult(
            "squawk lint",
            FAIL,
            "; ".join(parts + [detail])
            + "; accept in the project's opslib.toml ([[lint.accept]] revision, rule, reason; "
            "`opslib check --write-baseline --reason TEXT` writes today's), or with "
            "`# opslib-accept: RULE -- reason` in the revision",
        )
    accepted = sorted({f"{f.revision} {f.rule} ({f.reason})" for f in by[lint.Severity.ACCEPTED]})
    warned = sorted({f"{f.revision} {f.rule}" for f in by[lint.Severity.WARN]})
    info = by[lint.Severity.INFO]
    parts += [f"accepted: {', '.join(accepted)}"] if accepted else []
    parts += (
        [f"advice: {', '.join(warned[:12])}" + (f" and {len(warned) - 12} more" if len(warned) > 12 else "")]
        if warned
        else []
    )
    if info:
        parts.append(
            f"information: {len(info)} finding(s) on tables new or empty in the target, none can hold up traffic"
        )
    return CheckResult("squawk lint", WARN if warned else PASS, "; ".join(parts) or "no findings")


def check_naming(plan: migrate.DeployPlan) -> CheckResult:
    """Every pending revision's message says what it does (the guide's naming rule)."""
    vague = [(r.revision, vague_message(r.message)) for r in plan.pending if not r.is_merge]
    vague = [(rev, why) for rev, why in vague if why]
    if vague:
        return CheckResult("migration naming", FAIL, "; ".join(f"{rev}: {why}" for rev, why in vague))
    return CheckResult("migration naming", PASS, "every pending revision says what it does")


def check_drift(settings: Settings, plan: migrate.DeployPlan) -> CheckResult:
    """At head with nothing pending, the database matches the project's models."""
    if plan.pending:
        return CheckResult(
            "drift", SKIP, "compared with the models after the deploy (its verify step), at head"
        )
    if set(plan.current) != set(plan.heads):
        return CheckResult("drift", SKIP, "not at head")
    status, detail = migrate.compare_models(settings)
    return CheckResult("drift", FAIL if status == "fail" else status, detail)


def check_backup(
    settings: Settings, reached: Reached, backup_planned: bool, max_backup_age_h: float
) -> CheckResult:
    """Production: a recent verified backup exists, or the deploy will take one (and can)."""
    if settings.env != "production":
        return CheckResult("backup", SKIP, f"required in production only (environment {settings.env})")
    return CheckResult(
        "backup",
        *_backup_state(settings, reached.url.database, backup_planned, max_backup_age_h, reached.major),
    )


def pre_deploy(
    settings: Settings,
    target: str = "head",
    *,
    expect_env: str | None = None,
    backup_planned: bool = True,
    max_backup_age_h: float = 24.0,
    baseline_reason: str | None = None,
) -> CheckReport:
    """The guide's pre-deployment checklist as named checks; a failed one stops a deploy (exit 3).

    The report keeps the deploy plan it judged (``report.plan``) for the deploy that follows.
    """
    report = CheckReport("pre-deploy check")
    reachable, reached = check_reachable(settings)
    report.checks.append(reachable)
    if reached is None:
        return report
    report.checks.append(check_blocking_sessions(settings, reached))
    report.checks.append(check_invalid_indexes(reached))
    report.checks.append(check_restore_leftovers(settings))
    report.checks.append(check_environment(settings, expect_env))
    head = check_single_head(settings)
    report.checks.append(head)
    if head.status == FAIL:
        return report
    planned, plan = check_plan(settings, target)
    report.checks.extend(planned)
    if plan is None:
        return report
    report.plan = plan
    report.checks.append(check_downgrades(plan))
    report.checks.append(check_rendering(plan))
    linted, report.findings = check_lint(settings, plan, reached, baseline_reason)
    report.checks.append(linted)
    report.checks.append(check_naming(plan))
    report.checks.append(check_drift(settings, plan))
    report.checks.append(check_backup(settings, reached, backup_planned, max_backup_age_h))
    return report


def _backup_state(settings, database, planned, max_age_h, major) -> tuple[str, str]:
    for info in backup.list_backups(settings):
        if info.database == database and info.verified:
            taken = datetime.fromisoformat(info.started_at.replace("Z", "+00:00"))
            age_h = (datetime.now(timezone.utc) - taken).total_seconds() / 3600
            if age_h <= max_age_h:
                return PASS, f"verified backup {info.path.name}, {age_h:.1f} h old"
            break
    if not planned:
        return FAIL, f"no verified backup of {database!r} newer than {max_age_h:g} h, and none will be taken"
    try:
        tool = pgtools.pg_dump_for(major)
    except OpsError as err:
        return FAIL, f"the deploy must take a backup, but: {err.message}"
    return (
        PASS,
        f"no recent verified backup; the deploy takes and verifies one first (pg_dump {tool.version})",
    )
