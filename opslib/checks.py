"""The pre-deploy checks (the guide's checklist) and the setup check, one function per check.

Each check returns a :class:`~opslib.checkreport.CheckResult`; :func:`pre_deploy` runs them in the
guide's order over one :class:`~opslib.migrate.DeployPlan`, which the deploy then reuses, so the
plan, its offline SQL and the revision map are worked out once per run.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from opslib import backup, db, lint, migrate, pgtools, policy
from opslib.checkreport import FAIL, PASS, SKIP, WARN, CheckReport, CheckResult
from opslib.config import Settings
from opslib.errors import ConfigError, InvalidInput, OpsError
from opslib.naming import first_line, vague_message


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


def check_reachable(where: Settings | migrate.Target) -> tuple[CheckResult, Reached | None]:
    """Connect, and read the server's version, the database's fingerprint and long transactions."""
    target = migrate.Target.of(where)
    settings = target.settings
    try:
        url = target.url
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


def check_restore_leftovers(where: Settings | db.TargetDatabase) -> CheckResult:
    """Staging databases that killed restores over the target left (``<target>_restoring_<hex>``).

    A warning, not a failure: they hold a full copy's disk space but do not make a deploy unsafe.
    Staging databases of restores running now are not leftovers and are not named.
    """
    try:
        left = backup.leftover_restores(where)
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


def check_single_head(where: Settings | migrate.Target) -> CheckResult:
    """The Alembic project loads and has one head (several need a merge first)."""
    try:
        heads = migrate.Target.of(where).script.get_heads()
    except ConfigError:
        raise  # a revision that cannot be imported, a cycle: configuration (exit 2), not a finding
    except OpsError as err:
        return CheckResult("Alembic project", FAIL, err.message)
    if len(heads) > 1:
        return CheckResult(
            "single head",
            FAIL,
            f'{len(heads)} heads: {", ".join(heads)}; join them with `opslib merge -m "merge heads" {" ".join(heads)}`',
        )
    return CheckResult("single head", PASS, heads[0] if heads else "no revisions")


def check_plan(where: Settings | migrate.Target, revision: str) -> tuple[list[CheckResult], migrate.DeployPlan | None]:
    """The database's revision is one the code knows, and what the deploy to ``revision`` applies."""
    try:
        plan = migrate.deploy_plan(where, revision)
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
            _listed(pending, lambda r: f"{r.revision} ({first_line(r.message)})") if pending else "none: at the target",
        ),
    ], plan


def _listed(items, text, limit: int = 12) -> str:
    shown = ", ".join(text(i) for i in list(items)[:limit])
    more = f", and {len(items) - limit} more" if len(items) > limit else ""
    return f"{len(items)}: {shown}{more}"


def _accepted(rule: str, revisions, project: policy.Policy) -> tuple[list[str], list[str]]:
    """``revisions`` split into (not accepted, accepted with their reasons) for the check ``rule``."""
    left, accepted = [], []
    for rev in revisions:
        found = project.acceptance(rev, rule)
        if found is None:
            left.append(rev)
        else:
            accepted.append(f"{rev} ({found.reason})")
    return left, accepted


def _with_accepted(detail: str, accepted: list[str], project: policy.Policy) -> str:
    return detail + (f"; accepted in {project.where}: {', '.join(accepted)}" if accepted else "")


def check_downgrades(plan: migrate.DeployPlan, project: policy.Policy = policy.NO_POLICY) -> CheckResult:
    """Every pending revision can be reversed (a ``pass`` downgrade cannot). A merge revision has
    nothing of its own to reverse: its empty downgrade is what Alembic writes, and real."""
    irreversible = [r.revision for r in plan.pending if not r.is_merge and not migrate.has_real_downgrade(r)]
    irreversible, accepted = _accepted("downgrades", irreversible, project)
    if irreversible:
        return CheckResult(
            "downgrades",
            WARN,
            _with_accepted(f"no real downgrade in {', '.join(irreversible)}: rolling back needs a backup", accepted, project),
            tuple(irreversible),
        )
    return CheckResult("downgrades", PASS, _with_accepted("every pending revision has one", accepted, project))


def check_rendering(plan: migrate.DeployPlan, project: policy.Policy = policy.NO_POLICY) -> CheckResult:
    """The pending SQL renders offline, so it can be shown and linted (a revision that reads data cannot)."""
    why = dict(plan.sql.unrendered)
    left, accepted = _accepted("sql-renders-offline", list(why), project)
    if left:
        return CheckResult(
            "SQL renders offline",
            WARN,
            _with_accepted("; ".join(f"cannot render {rev} ({why[rev]})" for rev in left) + ": linted without it", accepted, project),
            tuple(left),
        )
    return CheckResult("SQL renders offline", PASS, _with_accepted(f"{len(plan.pending)} revision(s)", accepted, project))


def check_lint(
    settings: Settings, plan: migrate.DeployPlan, reached: Reached, project: policy.Policy = policy.NO_POLICY
) -> tuple[CheckResult, list[lint.Finding]]:
    """squawk over the pending SQL, each finding judged against the target and the project's policy."""
    if not plan.sql.sql:
        return CheckResult("squawk lint", SKIP, "nothing to lint"), []
    files = {r.revision: r.path for r in plan.pending}
    with db.connect(reached.url) as conn:
        findings = lint.lint(
            plan.sql.sql,
            files,
            pg_version=reached.version.split()[0],
            policy=project,
            read_tables=lambda names: db.table_facts(conn, names, settings.ddl_lock_timeout_s),
        )
    return _lint_result(findings), findings


def _lint_result(findings: list[lint.Finding]) -> CheckResult:
    """The lint check's verdict in a line: what blocks, by revision, rule and table, and how many findings
    were accepted, are advice or are information. Each finding, with squawk's advice and the line that
    accepts it, is in the findings table beside the checks (see :func:`opslib.display.findings_tables`)."""
    by = {s: [f for f in findings if f.severity is s] for s in lint.Severity}
    if by[lint.Severity.BLOCK]:
        unique = list(
            dict.fromkeys(f"{f.revision}: {f.rule} on {f.context or 'no table'}" for f in by[lint.Severity.BLOCK])
        )
        detail = "; ".join(unique[:5]) + (f"; and {len(unique) - 5} more" if len(unique) > 5 else "")
        return CheckResult(
            "squawk lint",
            FAIL,
            f"{len(unique)} blocking finding(s): {detail}; the findings table (`opslib check` prints it too) says how to fix or accept each",
            tuple(dict.fromkeys(f.revision for f in by[lint.Severity.BLOCK])),
        )
    parts: list[str] = []
    accepted = {(f.revision, f.rule) for f in by[lint.Severity.ACCEPTED]}
    if accepted:
        parts.append(f"accepted: {len(accepted)} finding(s), each with its reason in the findings table")
    warned = sorted({f"{f.revision} {f.rule}" for f in by[lint.Severity.WARN]})
    if warned:
        parts.append(f"advice: {', '.join(warned[:12])}" + (f" and {len(warned) - 12} more" if len(warned) > 12 else ""))
    if info := by[lint.Severity.INFO]:
        parts.append(
            f"information: {len(info)} finding(s) on tables new or empty in the target, none can hold up traffic"
        )
    return CheckResult("squawk lint", WARN if warned else PASS, "; ".join(parts) or "no findings")


def check_naming(
    plan: migrate.DeployPlan,
    project: policy.Policy = policy.NO_POLICY,
    new: "dict[str, migrate.RevisionInfo] | None" = None,
) -> CheckResult:
    """The guide's naming rule, for new revisions: a message says what the revision does.

    A revision already in the project's history only warns (its message is history: a deploy of a
    long-lived chain must not be refused for an upstream "New fixes"); a revision added on the current
    branch (``new``, from ``opslib check --new``) blocks, as ``opslib revision`` refuses such a message.
    """
    new = new or {}
    candidates = {r.revision: r for r in plan.pending}
    candidates.update(new)
    vague = {rev: vague_message(r.message) for rev, r in candidates.items() if not r.is_merge}
    vague = {rev: why for rev, why in vague.items() if why}
    left, accepted = _accepted("migration-naming", list(vague), project)
    blocking = [rev for rev in left if rev in new]
    if not left:
        return CheckResult(
            "migration naming", PASS, _with_accepted("every revision checked says what it does", accepted, project)
        )
    shown = [f"{rev}: {vague[rev]}" for rev in (blocking + [r for r in left if r not in new])]
    more = f"; and {len(shown) - 5} more" if len(shown) > 5 else ""
    if blocking:
        detail = f"{len(blocking)} revision(s) new on this branch: " + "; ".join(shown[:5]) + more
        return CheckResult("migration naming", FAIL, _with_accepted(detail, accepted, project), tuple(blocking))
    detail = (
        f"{len(left)} revision(s) of the project's history with a message that does not say what it does "
        "(a warning: naming blocks only new revisions, `opslib check --new`): " + "; ".join(shown[:5]) + more
    )
    return CheckResult("migration naming", WARN, _with_accepted(detail, accepted, project), tuple(left))


def check_env_target(settings: Settings, reached: Reached) -> CheckResult:
    """The project's env.py connects to opslib's target (the database this deploy locks, backs up and
    records), learned by running env.py online with no work. Another database is not a finding but a
    configuration error: :class:`~opslib.errors.TargetMismatch` (exit 2), before any backup or change."""
    try:
        with db.connect(reached.url) as conn:
            probe = migrate.probe_env(settings, reached.url, conn, refuse_other=True)
    except OpsError as err:
        if isinstance(err, InvalidInput):
            raise  # another database, or an env.py that cannot be imported: configuration, exit 2
        return CheckResult("env.py's database", FAIL, err.message)
    except Exception as err:  # noqa: BLE001 - the project's env.py failed online: what it said, without secrets
        lines = str(err).strip().splitlines()
        said = db.scrub(f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__, reached.url)
        return CheckResult("env.py's database", FAIL, f"the project's env.py fails online, before any revision: {said}")
    if probe.reached is None:
        return CheckResult("env.py's database", SKIP, "env.py configured no connection online")
    table = migrate.table_name(probe.version_table)
    return CheckResult(
        "env.py's database", PASS, f"env.py migrates {probe.reached.database} itself; its version table: {table}"
    )


def _by_policy(result: CheckResult, project: policy.Policy) -> CheckResult:
    """A check's result as the project's policy ([checks]) sets it: block (a warning fails), warn (a
    failure warns) or ignore (shown as skipped, with what it found)."""
    action = project.check_action(policy.check_rule(result.name))
    if action is None or result.status in (PASS, SKIP):
        return result
    said = f" ({action} in {project.where})"
    if action == "ignore":
        return replace(result, status=SKIP, detail=f"ignored{said}: {result.detail}")
    if action == "warn" and result.status == FAIL:
        return replace(result, status=WARN, detail=result.detail + said)
    if action == "block" and result.status == WARN:
        return replace(result, status=FAIL, detail=result.detail + said)
    return result


def check_drift(where: Settings | migrate.Target, plan: migrate.DeployPlan) -> CheckResult:
    """At head with nothing pending, the database matches the project's models."""
    if plan.pending:
        return CheckResult(
            "drift", SKIP, "compared with the models after the deploy (its verify step), at head"
        )
    if set(plan.current) != set(plan.heads):
        return CheckResult("drift", SKIP, "not at head")
    status, detail = migrate.compare_models(where)
    return CheckResult("drift", FAIL if status == "fail" else status, detail)


def check_backup(
    settings: Settings, reached: Reached, backup_planned: bool, max_backup_age_h: float, method: str = "dump"
) -> CheckResult:
    """Production: a recent verified backup exists, or the deploy will take one (and can)."""
    if settings.env != "production":
        return CheckResult("backup", SKIP, f"required in production only (environment {settings.env})")
    if backup_planned and method == "pgbackrest":
        return CheckResult(
            "backup",
            PASS,
            "the deploy makes a pgBackRest restore point first (and a backup, when the policy's ages ask); "
            "a server that does not archive WAL is refused then",
        )
    return CheckResult(
        "backup",
        *_backup_state(settings, reached.url.database, backup_planned, max_backup_age_h, reached.major),
    )


def pre_deploy(
    where: Settings | migrate.Target,
    revision: str = "head",
    *,
    expect_env: str | None = None,
    backup_planned: bool = True,
    max_backup_age_h: float = 24.0,
    baseline_reason: str | None = None,
    new_revisions: "dict[str, migrate.RevisionInfo] | None" = None,
    backup_method: str = "",
) -> CheckReport:
    """The guide's pre-deployment checklist as named checks; a failed one stops a deploy (exit 3).

    Each check is judged by the project's policy (``[checks]``, and acceptances per revision); an
    invalid policy is a :class:`~opslib.errors.ConfigError` (exit 2) before anything is read. With
    ``baseline_reason`` (``opslib check --write-baseline``), what blocks today is written to the policy
    as accepted, with that reason, and the checks are judged again. ``new_revisions`` (``check --new``)
    are the revisions added on the current branch, which the naming rule blocks. ``backup_method`` (a run's
    parameter) says how the planned backup is taken, instead of the policy's ``[backup] method``.

    The report keeps the deploy plan it judged (``report.plan``) for the deploy that follows.
    """
    target = migrate.Target.of(where)  # resolved once: every check reads this database and project
    settings = target.settings
    project = _with_method(target.policy(lint.is_squawk_rule), backup_method)
    report = _pre_deploy(target, revision, project, expect_env, backup_planned, max_backup_age_h, new_revisions)
    if baseline_reason is None:
        return report
    blocking = [(f.revision, f.rule) for f in report.findings if f.severity is lint.Severity.BLOCK]
    others = []
    for check in report.checks:
        rule = policy.check_rule(check.name)
        if check.status != FAIL or rule == "squawk-lint":
            continue
        if rule in policy.REVISION_CHECKS:
            blocking += [(rev, rule) for rev in check.revisions]
        else:
            others.append(rule)
    path, added = policy.write_baseline(settings.alembic_ini, blocking, baseline_reason, others)
    if added:
        project = _with_method(target.policy(lint.is_squawk_rule), backup_method)
        report = _pre_deploy(target, revision, project, expect_env, backup_planned, max_backup_age_h, new_revisions)
    report.checks.insert(0, CheckResult("baseline", PASS, f"{added} finding(s) accepted in {path}"))
    return report


def _with_method(project: policy.Policy, method: str) -> policy.Policy:
    """The policy, its backup method replaced by a run's own (none given: the policy's)."""
    if not method:
        return project
    return replace(project, backup=replace(project.backup, method=method))


def _pre_deploy(target, revision, project, expect_env, backup_planned, max_backup_age_h, new_revisions) -> CheckReport:
    report = _gather(target, revision, project, expect_env, backup_planned, max_backup_age_h, new_revisions)
    report.checks = [_by_policy(check, project) for check in report.checks]
    return report


def _gather(target, revision, project, expect_env, backup_planned, max_backup_age_h, new_revisions) -> CheckReport:
    report = CheckReport("pre-deploy check")
    settings = target.settings
    reachable, reached = check_reachable(target)
    report.checks.append(reachable)
    if reached is None:
        return report
    report.checks.append(check_blocking_sessions(settings, reached))
    report.checks.append(check_invalid_indexes(reached))
    report.checks.append(check_restore_leftovers(target))
    report.checks.append(check_environment(settings, expect_env))
    head = check_single_head(target)
    report.checks.append(head)
    if head.status == FAIL:
        return report
    planned, plan = check_plan(target, revision)
    report.checks.extend(planned)
    if plan is None:
        return report
    report.plan = plan
    report.checks.append(check_env_target(settings, reached))
    report.checks.append(check_downgrades(plan, project))
    report.checks.append(check_rendering(plan, project))
    linted, report.findings = check_lint(settings, plan, reached, project)
    report.checks.append(linted)
    report.checks.append(check_naming(plan, project, new_revisions))
    report.checks.append(check_drift(target, plan))
    report.checks.append(check_backup(settings, reached, backup_planned, max_backup_age_h, project.backup.method))
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
