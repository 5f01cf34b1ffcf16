"""Checks that return results instead of raising: each a :class:`CheckResult`, gathered in a :class:`CheckReport`.

A report is data for the CLI and notebooks to render; ``raise_for_failure`` turns a failed report
into :class:`~opslib.errors.ChecksFailed` (exit 3) for callers that must stop.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from opslib.config import Settings
from opslib.errors import ChecksFailed, OpsError

PASS, FAIL, SKIP = "pass", "fail", "skip"


@dataclass(frozen=True)
class CheckResult:
    """One check: its name, ``pass``/``fail``/``skip``, and what was seen."""

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

    @property
    def ok(self) -> bool:
        """True when no check failed."""
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
        return {"subject": self.subject, "ok": self.ok, "checks": [c.to_dict() for c in self.checks]}


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
