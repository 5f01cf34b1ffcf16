"""Checks that return results instead of raising: each a :class:`CheckResult`, gathered in a :class:`CheckReport`.

A report is data for the CLI and notebooks to render; ``raise_for_failure`` turns a failed report
into :class:`~opslib.errors.ChecksFailed` (exit 3) for callers that must stop.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from opslib.config import Settings
from opslib.errors import ChecksFailed, OpsError

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"


@dataclass(frozen=True)
class CheckResult:
    """One check: its name, ``pass``/``warn``/``fail``/``skip``, and what was seen."""

    name: str
    status: str
    detail: str = ""

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass
class CheckReport:
    """The results of a series of checks about one subject."""

    subject: str
    checks: list[CheckResult] = field(default_factory=list)
    findings: list = field(default_factory=list)
    # What a pre-deploy check found, for the deploy that follows it (so it is not worked out twice).
    pending: list = field(default_factory=list)
    sql: str = ""

    @property
    def ok(self) -> bool:
        """True when no check failed (warnings are advice)."""
        return all(c.status != FAIL for c in self.checks)

    def first_failure(self) -> CheckResult | None:
        """The first failed check, if any."""
        return next((c for c in self.checks if c.status == FAIL), None)

    def add(self, name: str, status: str, detail: str = "") -> CheckResult:
        """Append a result and return it."""
        result = CheckResult(name, status, detail)
        self.checks.append(result)
        return result

    def raise_for_failure(self) -> None:
        """Raise :class:`ChecksFailed` naming the first failed check, if any failed."""
        failed = self.first_failure()
        if failed is not None:
            raise ChecksFailed(f"{self.subject}: {failed.name} failed: {failed.detail}")

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {
            "subject": self.subject,
            "ok": self.ok,
            "checks": [c.to_dict() for c in self.checks],
            "findings": [f.to_dict() for f in self.findings],
        }


def verify_setup(settings: Settings) -> CheckReport:
    """The guide's `make verify-setup`: can opslib reach, migrate and back up this database?"""
    from opslib import db, migrate, pgtools

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


# The guide's "avoid vague names": messages made only of these words say nothing about the change.
_VAGUE = {
    "update", "updates", "fix", "fixes", "change", "changes", "stuff", "misc", "database", "db", "schema",
    "tables", "table", "things", "wip", "temp", "tmp", "test", "migration", "migrations", "new", "more", "some",
}  # fmt: skip


def vague_message(message: str) -> str | None:
    """Why a revision message is too vague to name a migration (the guide's `update_database`, `fix_stuff`), or None."""
    words = [w for w in re.split(r"[^a-z0-9]+", message.lower()) if w]
    if not words:
        return "it is empty"
    if all(w in _VAGUE for w in words):
        return f"{message!r} says nothing about the change: name what it does, e.g. add_user_profile_table"
    if len(words) < 2:
        return f"{message!r} is one word: say what changes and where, e.g. add_indexes_for_search_performance"
    return None


def pre_deploy(
    settings: Settings,
    target: str = "head",
    *,
    expect_env: str | None = None,
    backup_planned: bool = True,
    max_backup_age_h: float = 24.0,
) -> CheckReport:
    """The guide's pre-deployment checklist as named checks; a failed one stops a deploy (exit 3)."""
    from opslib import backup, db, lint, migrate, pgtools

    report = CheckReport("pre-deploy check")
    try:
        url = db.target_url(settings)
        with db.connect(url) as conn:
            version, major = db.server_version(conn)
            fingerprint = db.fingerprint(conn)
            blockers = db.blocking_sessions(conn, older_than_s=settings.ddl_lock_timeout_s)
        report.add("database reachable", PASS, f"{fingerprint}, PostgreSQL {version}")
    except OpsError as err:
        report.add("database reachable", FAIL, err.message)
        return report
    if blockers:
        report.add(
            "sessions that would block DDL",
            WARN,
            "; ".join(
                f"pid {b['pid']} ({b['application_name'] or 'no name'}, {b['state']}, in a transaction for "
                f"{b['seconds']} s, locking {b['tables']})"
                for b in blockers[:5]
            )
            + f": migrations wait at most {settings.ddl_lock_timeout_s:g} s per attempt for them, then retry",
        )
    else:
        report.add("sessions that would block DDL", PASS, "no long transaction holds a table lock")
    if expect_env and expect_env != settings.env:
        report.add("environment label", FAIL, f"OPSLIB_ENV is {settings.env!r}, expected {expect_env!r}")
    else:
        report.add("environment label", PASS, settings.env)
    try:
        script = migrate.script_directory(settings)
    except OpsError as err:
        report.add("Alembic project", FAIL, err.message)
        return report
    heads = script.get_heads()
    if len(heads) > 1:
        report.add(
            "single head",
            FAIL,
            f'{len(heads)} heads: {", ".join(heads)}; join them with `opslib merge -m "merge heads" {" ".join(heads)}`',
        )
        return report
    report.add("single head", PASS, heads[0] if heads else "no revisions")
    try:
        current, pending = migrate.plan(settings, "upgrade", target)
        report.pending = pending
    except OpsError as err:
        name = "database revision known" if "does not contain" in err.message else "target revision"
        detail = err.message
        if name == "database revision known":
            detail += (
                ". Out of sync: deploy the code that has this revision, or check the schema by hand and "
                "`opslib stamp` the revision it matches, or (development) run the reset runbook"
            )
        report.add(name, FAIL, detail)
        return report
    report.add("database revision known", PASS, ", ".join(current) or "base")
    report.add(
        "pending revisions",
        PASS,
        f"{len(pending)}: " + ", ".join(f"{r.revision} ({r.message})" for r in pending)
        if pending
        else "none: at the target",
    )
    irreversible = [r.revision for r in pending if not migrate.has_real_downgrade(r)]
    report.add(
        "downgrades",
        WARN if irreversible else PASS,
        f"no real downgrade in {', '.join(irreversible)}: rolling back needs a backup"
        if irreversible
        else "every pending revision has one",
    )
    sql, unrendered = _render(settings, current, pending)
    report.sql = sql
    report.add(
        "SQL renders offline",
        WARN if unrendered else PASS,
        f"cannot render {', '.join(unrendered)} (it reads data): linted without it"
        if unrendered
        else f"{len(pending)} revision(s)",
    )
    if sql:
        findings = lint.lint(sql, {r.revision: r.path for r in pending}, pg_version=version.split()[0])
        report.findings = findings
        failing = [f for f in findings if f.severity == "fail"]
        warned = sorted({f"{f.revision} {f.rule}" for f in findings if f.severity == "warn"})
        accepted = sorted(
            {f"{f.revision} {f.rule} ({f.reason})" for f in findings if f.severity == "accepted"}
        )
        if failing:
            unique = list(dict.fromkeys(f"{f.revision}: {f.rule}: {f.message}" for f in failing))
            detail = "; ".join(unique[:5]) + (f"; and {len(unique) - 5} more" if len(unique) > 5 else "")
            report.add(
                "squawk lint",
                FAIL,
                detail + "; accept with `# opslib-accept: RULE -- reason` in the revision",
            )
        else:
            parts = [f"advice: {', '.join(warned)}"] if warned else []
            parts += [f"accepted: {', '.join(accepted)}"] if accepted else []
            report.add("squawk lint", WARN if warned else PASS, "; ".join(parts) or "no findings")
    else:
        report.add("squawk lint", SKIP, "nothing to lint")
    vague = [(r.revision, vague_message(r.message)) for r in pending if not r.is_merge]
    vague = [(rev, why) for rev, why in vague if why]
    report.add(
        "migration naming",
        FAIL if vague else PASS,
        "; ".join(f"{rev}: {why}" for rev, why in vague)
        if vague
        else "every pending revision says what it does",
    )
    if pending:
        report.add("drift", SKIP, "compared with the models after the deploy (its verify step), at head")
    else:
        status, detail = (
            migrate.compare_models(settings) if set(current) == set(heads) else (SKIP, "not at head")
        )
        report.add("drift", FAIL if status == "fail" else status, detail)
    if settings.env == "production":
        report.add(
            "backup",
            *_backup_state(settings, url.database, backup_planned, max_backup_age_h, major, backup, pgtools),
        )
    else:
        report.add("backup", SKIP, f"required in production only (environment {settings.env})")
    return report


def _render(settings: Settings, current, pending) -> tuple[str, list[str]]:
    from opslib import migrate

    if not pending:
        return "", []
    start = current[0] if current else "base"
    try:
        return migrate.offline_sql(settings, f"{start}:{pending[-1].revision}"), []
    except OpsError:
        pass
    parts, unrendered = [], []
    for r in pending:
        below = r.down_revisions[0] if r.down_revisions else "base"
        try:
            parts.append(migrate.offline_sql(settings, f"{below}:{r.revision}"))
        except OpsError:
            unrendered.append(r.revision)
    return "\n".join(parts), unrendered


def _backup_state(settings, database, planned, max_age_h, major, backup, pgtools) -> tuple[str, str]:
    from datetime import datetime, timezone

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
